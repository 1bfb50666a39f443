# Sourced by the README's commands (scripts/test.sh, scripts/main.sh): creates the virtual
# environment $FOX_VENV (default .venv) with $PYTHON if it is missing, and installs fox-jax
# into it in editable mode with the extras given as the first argument (e.g. "[test]").
fox_venv() {
  VENV="${FOX_VENV:-.venv}"
  PYTHON="${PYTHON:-python3}"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".${1:-}"
}

#!/usr/bin/env bash
# The README's test command: creates its own virtual environment, installs fox-jax with its
# test extras and runs the whole suite. Extra arguments go to pytest.
# The torch-test extra (PyTorch CPU + flash-linear-attention, ~1.9 GB) is only for the tests
# that import fla's PyTorch model; FOX_TORCH_TESTS=0 leaves it out and those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
if [ "${FOX_TORCH_TESTS:-1}" = "0" ]; then fox_venv "[test]"; else fox_venv "[test,torch-test]"; fi
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" "$@"

#!/usr/bin/env bash
# The README's test command: creates its own virtual environment, installs fox-jax with its
# test extra and runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
fox_venv "[test]"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" "$@"

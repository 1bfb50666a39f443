#!/usr/bin/env bash
# On a GPU host with JAX (CUDA) installed: the Pallas GPU kernels compiled (not interpreted)
# against the float64 reference, then the headline benchmark (T = 16k, D = 128, forward and
# forward+backward, beside cuDNN causal attention and, when installed, fla-core). Uses the
# host's python3 and its JAX; extra arguments go to benchmarks/attention.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 -m pytest -q tests/pallas_kernels/test_gpu.py tests/pallas_kernels/test_anchor.py -k "not tpu"
python3 benchmarks/attention.py --reps 5 --no-pruning --impls pallas_gpu cudnn fla \
  --head-dims 128 --seq-lens 16384 "$@"

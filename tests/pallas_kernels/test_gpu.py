"""pallas_gpu against the float64 reference; cuda lowering and memory from the CPU.

On a CPU the kernels run in Pallas interpret mode with small tiles; when JAX's default
backend is a GPU the same cases run the compiled Triton kernels (with the tuned default
tiles) and a few larger cases are added.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import forgetting_attention
from pallas_kernels.forgetting_attention.common import BlockSizes
from pallas_kernels.forgetting_attention.pruning import Pruning
from tests.kernel_utils import case_id, grad_fn_to_lower, make_inputs, reference_f64
from tests.tolerances import assert_close

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
# Interpret mode runs every grid step on the CPU: small tiles keep it quick and still give
# several q and kv tiles per case (ragged last tiles, diagonal and off-diagonal paths).
SMALL = BlockSizes(block_q=16, block_k=32, block_q_bwd=32, block_k_bwd=16)


def _run(inp, block_sizes, pruning=None):
  """o, stats and the gradients of sum(o * do) through the public custom_vjp."""

  def f(q, k, v, lf):
    return forgetting_attention(q, k, v, lf, segment_ids=inp.segment_ids, pruning=pruning,
                                impl="pallas_gpu", block_sizes=block_sizes, interpret=INTERPRET,
                                return_stats=True)

  @jax.jit
  def run(q, k, v, lf, do):
    o, vjp, stats = jax.vjp(f, q, k, v, lf, has_aux=True)
    return o, stats, vjp(do)

  o, stats, (dq, dk, dv, dlf) = run(inp.q, inp.k, inp.v, inp.log_fgate, inp.do)
  return dict(o=o, lse=stats.lse, dq=dq, dk=dk, dv=dv, dlog_fgate=dlf), stats


def _check(got, ref, dtype, names):
  for name in names:
    assert_close(got[name], ref[name], dtype, name)


ALL = ("o", "lse", "dq", "dk", "dv", "dlog_fgate")

# (B, T, S, Hq, Hkv, D, dtype, gate, segments): each case covers several edges at once.
CASES = [
    (1, 1, 17, 2, 1, 32, jnp.float32, "medium", 0),       # T = 1 (decoding), GQA
    (1, 1, 45, 2, 2, 64, jnp.bfloat16, "medium", 0),      # one query after a cache
    (2, 37, 37, 4, 2, 64, jnp.bfloat16, "medium", 0),     # ragged tiles, GQA
    (1, 40, 70, 6, 2, 80, jnp.float32, "spread", 3),      # S > T, D = 80, group of 3, segments
    (1, 33, 33, 2, 1, 256, jnp.float16, "weak", 0),       # D = 256, almost no forgetting
    (1, 50, 50, 2, 2, 96, jnp.float16, "spread", 4),      # D = 96, segments
    # log f < -8: P_ii ~ 1 and dS hinges on the anchored form (see gpu.py).
    (1, 64, 64, 2, 1, 32, jnp.float32, "strong", 0),
    (1, 70, 90, 2, 2, 64, jnp.bfloat16, "strong", 2),
]
if ON_GPU:
  CASES += [
      (2, 1000, 1000, 4, 2, 128, jnp.bfloat16, "spread", 0),
      (1, 2048, 2048, 4, 4, 64, jnp.float32, "medium", 5),
      (1, 777, 1500, 8, 2, 128, jnp.float16, "weak", 2),
      (1, 512, 512, 2, 1, 256, jnp.bfloat16, "medium", 0),
  ]


@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_matches_reference(case):
  inp = make_inputs(*case[:8], segments=case[8], seed=sum(case[:6]))
  got, stats = _run(inp, None if ON_GPU else SMALL)
  _check(got, reference_f64(inp), case[6], ALL)
  assert np.all(np.asarray(stats.kept_tiles) <= np.asarray(stats.total_tiles))


PRUNED = [(1, 96, 96, 4, 2, 32, jnp.bfloat16, "strong", 0),
          (2, 80, 112, 4, 4, 64, jnp.float32, "spread", 3)]


@pytest.mark.parametrize("case", PRUNED, ids=[case_id(*c) for c in PRUNED])
def test_pruning_skips_tiles_and_stays_exact(case):
  """With log_tolerance = -30 the pruned weights are below float32 resolution, so the
  result must match the unpruned float64 reference while tiles are actually skipped."""
  inp = make_inputs(*case[:8], segments=case[8], seed=7)
  bs = BlockSizes(16, 16) if INTERPRET else BlockSizes(32, 32)
  got, stats = _run(inp, bs, Pruning(log_tolerance=-30.0))
  _check(got, reference_f64(inp), case[6], ALL)
  kept, total = np.asarray(stats.kept_tiles), np.asarray(stats.total_tiles)
  assert np.all(kept <= total) and np.sum(kept) < np.sum(total)


# ----------------------------------------------------------------------------- cuda lowering


LOWER = [(64, False, False), (64, True, True), (128, False, True), (128, True, False)]


@pytest.mark.parametrize("D,segments,pruned", LOWER,
                         ids=[f"T4096-D{d}{'-SEG' if s else ''}{'-ACP' if p else ''}"
                              for d, s, p in LOWER])
def test_lowers_for_cuda(D, segments, pruned):
  fn, shapes = grad_fn_to_lower("pallas_gpu", 4096, D, segments=segments,
                                pruning=Pruning() if pruned else None)
  text = fn.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  # Forward, dQ and dK/dV: three Triton kernels.
  assert len(re.findall(r"__gpu\$xla\.gpu\.triton", text)) == 3, "expected 3 Triton kernels"
  for name in ("forgetting_attention_fwd", "forgetting_attention_dq", "forgetting_attention_dkv"):
    assert name in text


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "i1": 1, "f64": 8, "i64": 8, "i8": 1}


def _tensor_sizes(text):
  """Element counts and bytes of every ranked tensor type in StableHLO text."""
  sizes = []
  for dims, dt in re.findall(r"tensor<((?:\d+x)*)(\w+)>", text):
    n = int(np.prod([int(d) for d in dims.split("x") if d])) if dims else 1
    sizes.append((n, n * _DTYPE_BYTES.get(dt, 4)))
  return sizes


@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "ACP"])
def test_memory_linear_in_t(pruned):
  """Forward+backward at T = 16384 vs 8192: nothing near T^2, and about double the bytes."""
  stats = {}
  for T in (8192, 16384):
    fn, shapes = grad_fn_to_lower("pallas_gpu", T, 128,
                                  pruning=Pruning() if pruned else None)
    if ON_GPU:
      mem = fn.lower(*shapes).compile().memory_analysis()
      stats[T] = (mem.temp_size_in_bytes, mem.temp_size_in_bytes + mem.output_size_in_bytes)
      assert mem.temp_size_in_bytes < T * T  # a bf16 [T, T] logits tensor per head is 2 T^2
    else:
      text = fn.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
      sizes = _tensor_sizes(text)
      largest_elems = max(n for n, _ in sizes)
      # The reference's logits would be Hq * T^2 elements; q itself is T * Hq * D.
      assert largest_elems < T * T // 4, f"a tensor of {largest_elems} elements at T={T}"
      stats[T] = (max(b for _, b in sizes), sum(b for _, b in sizes))
  for small, big in zip(stats[8192], stats[16384]):
    assert big <= 2.2 * small, f"{stats}"

"""pallas_tpu against the float64 reference (TPU interpret mode on a CPU); tpu lowering.

TPU interpret mode emulates every grid step, DMA and VMEM buffer on the CPU and is slow, so
the cases are few and small, each covering several edges at once, with the smallest legal
TPU tiles (16 queries x 128 keys) to get several q and kv tiles per case.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import forgetting_attention
from pallas_kernels.forgetting_attention import pruning as pruning_lib
from pallas_kernels.forgetting_attention.common import BlockSizes
from pallas_kernels.forgetting_attention.pruning import Pruning
from tests.kernel_utils import case_id, grad_fn_to_lower, make_inputs, reference_f64
from tests.tolerances import assert_close

ON_TPU = jax.default_backend() == "tpu"
SMALL = BlockSizes(block_q=16, block_k=128, block_q_bwd=32, block_k_bwd=128)
ALL = ("o", "lse", "dq", "dk", "dv", "dlog_fgate")


def _run(inp, block_sizes, pruning=None):
  """o, stats and the gradients of sum(o * do) through the public op."""

  def f(q, k, v, lf):
    return forgetting_attention(q, k, v, lf, segment_ids=inp.segment_ids, pruning=pruning,
                                impl="pallas_tpu", block_sizes=block_sizes,
                                interpret=not ON_TPU, return_stats=True)

  @jax.jit
  def run(q, k, v, lf, do):
    o, vjp, stats = jax.vjp(f, q, k, v, lf, has_aux=True)
    return o, stats, vjp(do)

  o, stats, (dq, dk, dv, dlf) = run(inp.q, inp.k, inp.v, inp.log_fgate, inp.do)
  return dict(o=o, lse=stats.lse, dq=dq, dk=dk, dv=dv, dlog_fgate=dlf), stats


def _check(got, ref, dtype):
  for name in ALL:
    assert_close(got[name], ref[name], dtype, name)


# (B, T, S, Hq, Hkv, D, dtype, gate, segments)
CASES = [
    # S > T (prefill after a cache), GQA, T not a multiple of either tile, D padded to 128.
    (1, 40, 150, 4, 2, 32, jnp.float32, "medium", 0),
    # bfloat16, packed documents, ragged tiles, group of 2.
    (1, 200, 200, 2, 1, 64, jnp.bfloat16, "spread", 3),
    # log f < -8: P_ii ~ 1, dS hinges on the anchored form; segments; D = 80.
    (2, 70, 130, 2, 2, 80, jnp.float32, "strong", 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case_id(*c) for c in CASES])
def test_matches_reference(case):
  inp = make_inputs(*case[:8], segments=case[8], seed=sum(case[:6]))
  got, stats = _run(inp, SMALL)
  _check(got, reference_f64(inp), case[6])
  assert np.all(np.asarray(stats.kept_tiles) <= np.asarray(stats.total_tiles))


@pytest.mark.slow
def test_pruning_elementwise_and_skips_tiles():
  """At the default tolerance the kernels must compute the reference's element-wise pruned
  function exactly (pairs below delta dropped inside kept tiles too) while skipping tiles:
  the head with decay length 2 prunes whole tiles, the one with 4096 nothing."""
  B, T, S, Hq, Hkv, D, dtype = 1, 300, 384, 4, 2, 32, jnp.float32
  inp = make_inputs(B, T, S, Hq, Hkv, D, dtype, gate="spread", seed=11)
  prune = Pruning(log_tolerance=-10.0)
  got, stats = _run(inp, SMALL, prune)
  delta = pruning_lib.threshold(inp.q, inp.k, prune, D ** -0.5)
  _check(got, reference_f64(inp, prune_threshold=delta), dtype)
  kept, total = np.asarray(stats.kept_tiles), np.asarray(stats.total_tiles)
  assert np.all(kept <= total) and np.sum(kept) < np.sum(total)


@pytest.mark.slow
def test_pruning_bf16_strong_gates_matches_unpruned():
  """With log_tolerance = -30 the pruned weights are far below bfloat16 resolution: the
  result matches the unpruned reference while tiles are skipped (q blocks past the first kv
  tile's reach skip it in the forward and dQ passes, and it stops its dK/dV q loop early)."""
  case = (1, 256, 256, 2, 1, 32, jnp.bfloat16, "strong")
  inp = make_inputs(*case, seed=7)
  got, stats = _run(inp, SMALL, Pruning(log_tolerance=-30.0))
  _check(got, reference_f64(inp), case[6])
  kept, total = np.asarray(stats.kept_tiles), np.asarray(stats.total_tiles)
  assert np.all(kept <= total) and np.sum(kept) < np.sum(total)


# ----------------------------------------------------------------------------- api wiring


@pytest.mark.skipif(ON_TPU, reason="checks the refusal on a non-TPU backend")
def test_refuses_non_tpu_backend_without_interpret():
  q = jnp.ones((1, 8, 2, 16), jnp.float32)
  lf = -jnp.ones((1, 8, 2), jnp.float32)
  with pytest.raises(ValueError, match="impl='pallas_tpu' needs a TPU backend"):
    forgetting_attention(q, q, q, lf, impl="pallas_tpu")


# ----------------------------------------------------------------------------- tpu lowering


LOWER = [(64, False, False), (64, True, True), (128, False, True), (128, True, False)]


@pytest.mark.parametrize("D,segments,pruned", LOWER,
                         ids=[f"T4096-D{d}{'-SEG' if s else ''}{'-ACP' if p else ''}"
                              for d, s, p in LOWER])
def test_lowers_for_tpu(D, segments, pruned):
  """Mosaic lowering checks block shapes, layouts and every op of the kernel bodies."""
  fn, shapes = grad_fn_to_lower("pallas_tpu", 4096, D, segments=segments,
                                pruning=Pruning() if pruned else None)
  text = fn.trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
  # Forward, dQ and dK/dV: three Mosaic kernels.
  assert len(re.findall(r"custom_call @tpu_custom_call", text)) == 3, "expected 3 Mosaic kernels"
  for name in ("forgetting_attention_fwd", "forgetting_attention_dq", "forgetting_attention_dkv"):
    assert f'kernel_name = "{name}"' in text

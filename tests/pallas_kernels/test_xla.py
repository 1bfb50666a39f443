"""The blockwise XLA implementation against the float64 reference: output, lse, every gradient.

Cases cover every value of each axis (B, T, S > T, GQA ratios, head dims, dtypes, segments,
forget-gate regimes) in combinations that stress the edges (T = 1 with a long cache, T not a
multiple of the block, strong forgetting in low precision, many heads per kv head), with
small tiles so that short sequences still span many tiles. A long-sequence case checks the
precision of the cumulative gate at T = 16384, and a memory case checks that the compiled
forward+backward stays linear in T.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, Pruning, forgetting_attention
from pallas_kernels.forgetting_attention import xla
from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference
from tests.kernel_utils import (Inputs, case_id, grad_fn_to_lower, make_inputs, make_log_fgate,
                                reference_f64)
from tests.tolerances import assert_close

F32, BF16, F16 = np.float32, jnp.bfloat16, np.float16

# (B, T, S, Hq, Hkv, D, dtype, gate, segments, (block_q, block_k) or None for the defaults)
CASES = [
    (1, 1, 1, 4, 4, 32, F32, "medium", 0, None),
    (2, 1, 300, 8, 1, 128, BF16, "strong", 3, (16, 64)),
    (1, 63, 63, 4, 2, 64, F32, "weak", 0, (16, 32)),
    (2, 111, 111, 4, 2, 64, F16, "spread", 4, (32, 16)),
    (1, 111, 200, 8, 1, 80, F32, "strong", 2, (32, 64)),
    (2, 63, 130, 4, 4, 256, BF16, "medium", 0, (32, 32)),
    (1, 111, 111, 4, 2, 96, F16, "strong", 3, (64, 16)),
    (2, 63, 63, 4, 4, 128, F32, "spread", 3, None),
    (1, 1000, 1000, 4, 2, 32, F32, "spread", 5, None),
    (1, 1000, 1100, 8, 1, 64, BF16, "strong", 0, (128, 64)),
    (2, 1000, 1000, 4, 4, 80, F16, "weak", 2, (64, 128)),
]


def _id(case):
  B, T, S, Hq, Hkv, D, dtype, gate, segments, blocks = case
  tiles = "" if blocks is None else f"-BQ{blocks[0]}-BK{blocks[1]}"
  return case_id(B, T, S, Hq, Hkv, D, dtype, gate, segments) + tiles


def xla_outputs(inp: Inputs, block_sizes=None, dlse=None):
  """o, lse, kept_tiles and the gradients of sum(o * do) + sum(lse * dlse) through ``xla``,
  as one jitted program (one compilation per case)."""

  @jax.jit
  def run(q, k, v, lf, segment_ids, do, dlse):
    def f(q, k, v, lf):
      o, stats = forgetting_attention(q, k, v, lf, segment_ids=segment_ids, impl="xla",
                                      block_sizes=block_sizes, return_stats=True)
      return (o, stats.lse), stats.kept_tiles

    (o, lse), vjp, kept = jax.vjp(f, q, k, v, lf, has_aux=True)
    dq, dk, dv, dlf = vjp((do, jnp.zeros_like(lse) if dlse is None else dlse))
    return {"o": o, "lse": lse, "kept": kept, "dq": dq, "dk": dk, "dv": dv, "dlog_fgate": dlf}

  return run(inp.q, inp.k, inp.v, inp.log_fgate, inp.segment_ids, inp.do, dlse)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_float64_reference(case):
  B, T, S, Hq, Hkv, D, dtype, gate, segments, blocks = case
  inp = make_inputs(B, T, S, Hq, Hkv, D, dtype, gate=gate, segments=segments, seed=T + S + D)
  got = xla_outputs(inp, None if blocks is None else BlockSizes(*blocks))
  ref = reference_f64(inp)
  assert got["o"].dtype == inp.q.dtype and got["lse"].dtype == jnp.float32
  for name in ("o", "lse", "dq", "dk", "dv", "dlog_fgate"):
    assert_close(got[name], ref[name], dtype, name)
  for name in ("dq", "dk", "dv"):
    assert got[name].dtype == inp.q.dtype, name


def test_lse_cotangent_reaches_every_gradient():
  """A loss on the log-sum-exp (return_stats) differentiates like the reference's."""
  inp = make_inputs(2, 77, 140, 4, 2, 32, F32, gate="strong", segments=3, seed=5)
  dlse = jnp.asarray(np.random.default_rng(6).normal(size=(2, 4, 77)), jnp.float32)
  got = xla_outputs(inp, BlockSizes(16, 32), dlse=dlse)
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    f = lambda q, k, v, lf: forgetting_attention_reference(q, k, v, lf,
                                                           segment_ids=inp.segment_ids)
    _, vjp = jax.vjp(f, f64(inp.q), f64(inp.k), f64(inp.v), f64(inp.log_fgate))
    ref = dict(zip(("dq", "dk", "dv", "dlog_fgate"), map(np.asarray, vjp((f64(inp.do), f64(dlse))))))
  for name, expected in ref.items():
    assert_close(got[name], expected, F32, name)


def test_jit_matches_eager_and_decode_step():
  """jax.jit changes nothing, and a one-query step over a long cache computes every kv tile."""
  inp = make_inputs(2, 1, 700, 4, 2, 64, BF16, gate="spread", seed=7)
  args = (inp.q, inp.k, inp.v, inp.log_fgate)
  call = lambda *a: forgetting_attention(*a, impl="xla", return_stats=True)
  eager_o, eager_stats = call(*args)
  jit_o, jit_stats = jax.jit(call)(*args)
  assert_close(jit_o, eager_o, F32, "o jit vs eager")
  assert_close(jit_stats.lse, eager_stats.lse, F32, "lse jit vs eager")
  assert_close(eager_o, reference_f64(inp, grads=False)["o"], BF16, "o")
  np.testing.assert_array_equal(jit_stats.kept_tiles, jit_stats.total_tiles)
  bk = xla.default_block_sizes(64).block_k
  np.testing.assert_array_equal(jit_stats.kept_tiles, math.ceil(700 / bk))


def _two_regimes(rng, B, S):
  """[B, S, 2] log gates: head 0 strong (|c| ~ 1.5e5 at 16k), head 1 medium (|c| ~ 1e4)."""
  return np.concatenate([make_log_fgate(rng, B, S, 1, "strong"),
                         make_log_fgate(rng, B, S, 1, "medium")], axis=-1)


@pytest.mark.slow
def test_long_sequence_precision():
  """T = S = 16384 with strong and medium forgetting, against float64 on the last rows.

  The float64 reference with only the last R queries over all S keys reproduces those rows,
  and with do nonzero only on them, the gradient of every q row, k, v and log_fgate.
  """
  B, S, Hq, Hkv, D, R = 1, 16384, 2, 1, 32, 256
  rng = np.random.default_rng(11)
  q = rng.normal(size=(B, S, Hq, D))
  k = rng.normal(size=(B, S, Hkv, D))
  v = rng.normal(size=(B, S, Hkv, D))
  do = np.zeros((B, S, Hq, D))
  do[:, -R:] = rng.normal(size=(B, R, Hq, D))
  lf = _two_regimes(rng, B, S)
  cast = lambda x: jnp.asarray(x, jnp.float32)
  full = Inputs(cast(q), cast(k), cast(v), jnp.asarray(lf), None, cast(do))
  got = xla_outputs(full)
  rows = Inputs(cast(q[:, -R:]), full.k, full.v, full.log_fgate, None, cast(do[:, -R:]))
  ref = reference_f64(rows)
  assert_close(got["o"][:, -R:], ref["o"], F32, "o")
  assert_close(got["lse"][:, :, -R:], ref["lse"], F32, "lse")
  assert_close(got["dq"][:, -R:], ref["dq"], F32, "dq")
  assert not np.any(np.asarray(got["dq"][:, :-R])), "rows with do = 0 must get dq = 0"
  for name in ("dk", "dv", "dlog_fgate"):
    assert_close(got[name], ref[name], F32, name)


def _compiled_temp_bytes(T: int) -> int:
  B, H, D = 1, 2, 32
  q = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
  lf = jax.ShapeDtypeStruct((B, T, H), jnp.float32)

  def loss(q, k, v, lf):
    return jnp.sum(forgetting_attention(q, k, v, lf, impl="xla"))

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  return step.lower(q, q, q, lf).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_memory_linear_in_sequence_length():
  """Forward+backward temporaries: far below one head's T^2 float32 logits, ~linear in T."""
  small, large = _compiled_temp_bytes(8192), _compiled_temp_bytes(16384)
  assert large < 4 * 16384 ** 2 / 16, f"{large} bytes of temporaries at T=16384"
  assert large / small <= 2.3, f"temporaries grow {large / small:.2f}x when T doubles"


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_for_accelerators(platform):
  """The blockwise path (any backend's fallback) lowers for TPU and GPU from a CPU, forward
  and backward, with segments and pruning."""
  fn, shapes = grad_fn_to_lower("xla", 2048, 128, segments=True, pruning=Pruning())
  text = fn.trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
  assert "stablehlo.while" in text  # the tile loops survive as loops, not unrolled

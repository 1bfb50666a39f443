"""Gradients at large logits: the backward's P must be the forward's, bit for bit in lse.

Each backward recomputes P_ij = exp(s_ij - lse_i) from the log-sum-exp the forward saved.
An error e in lse scales a whole row of P by exp(-e), and a float32 lse of size |s| that is
rounded once more on its way to the backward carries e ~ |s| 2^-24: a relative gradient
error of 1e-4 at logits ~1e3 and inf at ~1e9. pallas_gpu computes base-2 logits and used
to hand its backward the natural-log lse, converted there and back (two roundings); it now
keeps lse2 in base 2. One key with huge logits against every query (P ~ 1 or ~ 0 where it
is visible) makes the result well conditioned, so any float32 implementation whose
backward sees the forward's P matches float64 to float32 tolerance at every magnitude.

pallas_gpu runs with the same tiles in its forward and backward: in interpret mode XLA:CPU
may round a logit differently (fused multiply-adds, dot blocking) in kernels of different
tile shapes, which at logits ~1e4 is itself an error of ~1e-3 in P; on a GPU the three
Triton kernels compute the logits with the same code and the same dot order.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, forgetting_attention
from pallas_kernels.forgetting_attention import registry
from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference
from tests.kernel_utils import interpret_for, make_inputs
from tests.tolerances import assert_close

TILES = {"xla": BlockSizes(16, 16), "pallas_gpu": BlockSizes(16, 32, 16, 32),
         "pallas_tpu": BlockSizes(16, 128, 32, 128)}
NAMES = ("o", "lse", "dq", "dk", "dv", "dlog_fgate")
MAGNITUDES = (1e2, 1e3, 1e4, 1e6)


def _inputs(magnitude):
  """B=1, T=24 queries after 16 cached keys, Hq=4 over Hkv=2, D=8, strong gates; key 30 of
  kv head 1 is scaled so that its largest |logit| is ``magnitude``."""
  inp = make_inputs(1, 24, 40, 4, 2, 8, jnp.float32, gate="strong", seed=4)
  q, k = np.asarray(inp.q), np.asarray(inp.k).copy()
  k[0, 30, 1] = 1.0
  top = np.max(np.abs(np.einsum("thd,d->th", q[0, :, 2:], k[0, 30, 1]))) * 8 ** -0.5
  k[0, 30, 1] *= magnitude / top
  dlse = np.random.default_rng(5).normal(size=(1, 4, 24)).astype(np.float32)
  return inp._replace(k=jnp.asarray(k)), jnp.asarray(dlse)


def _expected_f64(inp, dlse):
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    (o, lse), vjp = jax.vjp(forgetting_attention_reference,
                            *map(f64, (inp.q, inp.k, inp.v, inp.log_fgate)))
    grads = vjp((f64(inp.do), f64(dlse)))
    return {name: np.asarray(x) for name, x in zip(NAMES, (o, lse, *grads))}


@functools.lru_cache(maxsize=None)
def _run_fn(impl):
  def f(q, k, v, lf):
    o, stats = forgetting_attention(q, k, v, lf, impl=impl, block_sizes=TILES[impl],
                                    interpret=interpret_for(impl), return_stats=True)
    return o, stats.lse

  @jax.jit
  def run(q, k, v, lf, do, dlse):
    (o, lse), vjp = jax.vjp(f, q, k, v, lf)
    return (o, lse, *vjp((do, dlse)))

  return run


@pytest.mark.parametrize("impl", registry.BLOCKWISE)
def test_gradients_at_large_logits(impl):
  for magnitude in MAGNITUDES:
    inp, dlse = _inputs(magnitude)
    got = _run_fn(impl)(inp.q, inp.k, inp.v, inp.log_fgate, inp.do, dlse)
    expected = _expected_f64(inp, dlse)
    for name, x in zip(NAMES, got):
      assert_close(x, expected[name], jnp.float32, f"{impl} logits ~{magnitude:g} {name}")

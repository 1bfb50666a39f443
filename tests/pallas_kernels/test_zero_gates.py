"""Zero and NaN forget gates, in every implementation, against a float64 formula written here.

The semantics (api docstring, kernel README "Zero gates"):
  - f_t = 0 (log f_t = -inf) forgets everything before t: every pair (i, j) with a zero gate
    at some l in (j, i] has weight exactly 0; the key at t stays visible. A finite log f so
    negative that those weights are 0 anyway (-3e38, or gates whose prefix sum overflows
    float32) behaves the same. The gradient with respect to such a gate is exactly 0, and
    every gradient is finite and matches the float64 one.
  - a NaN gate at t: the output and lse are NaN at every query position >= t of its batch x
    head (and finite before), and the gradients are not silently finite.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, Pruning, forgetting_attention
from pallas_kernels.forgetting_attention import registry
from tests.kernel_utils import Inputs, interpret_for, make_inputs, reference_f64
from tests.tolerances import assert_close

IMPLS = list(registry.IMPLS)
TILES = {"reference": None, "xla": BlockSizes(16, 16), "pallas_gpu": BlockSizes(16, 32, 32, 16),
         "pallas_tpu": BlockSizes(16, 128, 32, 128)}
NAMES = ("o", "lse", "dq", "dk", "dv", "dlog_fgate")
# Any test gate below this is a zero gate; the ordinary ones are above -40.
ZERO_BELOW = -1e4


def _zero_gate_inputs(dtype=jnp.float32) -> Inputs:
  """B=1, T=40 queries after a cache of 16, Hq=4 over Hkv=2, two segments; per head:
  0: f = 0 at positions 10 (in the cache) and 30;  1: log f = -3e38 at 20;
  2: log f = -2e37 at every third position from 5 (the prefix sum overflows float32 by 8);
  3: f = 0 at position 0, which no D_ij includes (it must change nothing)."""
  inp = make_inputs(1, 40, 56, 4, 2, 16, dtype, gate="medium", segments=2, seed=30)
  lf = np.asarray(inp.log_fgate).copy()
  lf[0, [10, 30], 0] = -np.inf
  lf[0, 20, 1] = -3e38
  lf[0, 5::3, 2] = -2e37
  lf[0, 0, 3] = -np.inf
  return inp._replace(log_fgate=jnp.asarray(lf))


def _expected_f64(inp: Inputs) -> dict:
  """The semantics in float64, straight from the definition: D_ij = sum_{l=j+1..i} log f_l
  as a sum over an explicit [T, S, S] indicator of the l in (j, i], -inf when one of those
  l is a zero gate. Gradients of sum(o * do) by autodiff."""
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    B, T, Hq, D = inp.q.shape
    S, Hkv = inp.k.shape[1], inp.k.shape[2]
    i = np.arange(S - T, S)[:, None, None]
    j = np.arange(S)[None, :, None]
    l = np.arange(S)[None, None, :]
    between = jnp.asarray((j < l) & (l <= i), jnp.float64)  # [T, S, S]
    zero = jnp.asarray(np.asarray(inp.log_fgate) < ZERO_BELOW)  # [B, S, H]
    visible = i[..., 0] >= j[..., 0]  # [T, S]
    if inp.segment_ids is not None:
      seg = np.asarray(inp.segment_ids)
      visible = visible[None] & (seg[:, S - T:, None] == seg[:, None, :])
    visible = jnp.asarray(np.broadcast_to(visible, (B, T, S)))[:, None]  # [B, 1, T, S]

    def f(q, k, v, lf):
      k = jnp.repeat(k, Hq // Hkv, axis=2)
      v = jnp.repeat(v, Hq // Hkv, axis=2)
      decay = jnp.einsum("tsl,blh->bhts", between, jnp.where(zero, 0.0, lf))
      crossed = jnp.einsum("tsl,blh->bhts", between, zero.astype(jnp.float64)) > 0
      s = D ** -0.5 * jnp.einsum("bthd,bshd->bhts", q, k) + jnp.where(crossed, -jnp.inf, decay)
      s = jnp.where(visible, s, -jnp.inf)
      lse = jax.nn.logsumexp(s, axis=-1)  # [B, H, T]
      o = jnp.einsum("bhts,bshd->bthd", jnp.exp(s - lse[..., None]), v)
      return o, lse

    (o, lse), vjp = jax.vjp(f, *map(f64, (inp.q, inp.k, inp.v, inp.log_fgate)))
    grads = vjp((f64(inp.do), jnp.zeros_like(lse)))
    return {name: np.asarray(x) for name, x in zip(NAMES, (o, lse, *grads))}


@functools.lru_cache(maxsize=None)
def _run_fn(impl, pruning, has_seg):
  """A jitted function of the inputs: o, lse and the gradients of sum(o * do)."""

  def run(q, k, v, lf, seg, do):
    def f(q, k, v, lf):
      o, stats = forgetting_attention(q, k, v, lf, segment_ids=seg if has_seg else None,
                                      pruning=pruning, impl=impl, block_sizes=TILES[impl],
                                      interpret=interpret_for(impl), return_stats=True)
      return o, stats

    o, vjp, stats = jax.vjp(f, q, k, v, lf, has_aux=True)
    return (o, stats.lse, *vjp(do.astype(o.dtype))), stats

  return jax.jit(run)


def _run(impl, inp: Inputs, pruning=None):
  outs, stats = _run_fn(impl, pruning, inp.segment_ids is not None)(
      inp.q, inp.k, inp.v, inp.log_fgate, inp.segment_ids, inp.do)
  return {name: np.asarray(x, np.float64) for name, x in zip(NAMES, outs)}, stats


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_gates_forget_exactly(impl):
  inp = _zero_gate_inputs()
  got, _ = _run(impl, inp)
  expected = _expected_f64(inp)
  for name in NAMES:
    assert_close(got[name], expected[name], jnp.float32, f"{impl} {name}")
  zero = np.asarray(inp.log_fgate) < ZERO_BELOW
  assert not np.any(got["dlog_fgate"][zero]), "the gradient at a zero gate must be exactly 0"


def test_reference_matches_the_formula_in_float64():
  """The float64 oracle of the other tests (reference_f64) follows the same semantics."""
  inp = _zero_gate_inputs()
  got = reference_f64(inp)
  expected = _expected_f64(inp)
  for name in ("o", "dq", "dk", "dv", "dlog_fgate"):
    assert_close(got[name], expected[name], jnp.float64, name)


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_zero_gates_with_pruning(impl):
  """Tiles across a zero gate are prunable (their corner decay is at most the floor): they
  are skipped, and with log_tolerance = -30 the result is the unpruned one."""
  inp = _zero_gate_inputs()
  got, stats = _run(impl, inp, Pruning(log_tolerance=-30.0))
  expected = _expected_f64(inp)
  for name in NAMES:
    assert_close(got[name], expected[name], jnp.float32, f"{impl} {name}")
  assert np.sum(np.asarray(stats.kept_tiles)) < np.sum(np.asarray(stats.total_tiles))


def test_many_zero_gates_keep_float32_precision():
  """Each floored gate adds |F| = 2U + 128 to |c|: with a zero gate every 4th token and
  U ~ 70, |c| reaches ~7e4 by T = 1024, where float32's spacing is 2^-7 (a plain float32
  cumsum misses the output tolerance here 6x). The double-float c keeps D, and so every
  result, at float32 precision."""
  T, Hq, D = 1024, 2, 16
  inp = make_inputs(1, T, T, Hq, 1, D, jnp.float32, gate="medium", seed=31, qk_scale=2.5)
  lf = np.asarray(inp.log_fgate).copy()
  lf[0, 3::4, 0] = -np.inf
  lf[0, 1::4, 1] = -1e38
  inp = inp._replace(log_fgate=jnp.asarray(lf))
  got, _ = _run("xla", inp)
  expected = reference_f64(inp)
  for name in NAMES:
    assert_close(got[name], expected[name], jnp.float32, name)


@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "ACP"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_gate_reaches_every_later_query(impl, pruned):
  """A NaN gate at position t of head h: o and lse NaN at every query position >= t of
  that head, finite before t and in the other heads; the gradients are not all finite."""
  inp = make_inputs(1, 40, 56, 4, 2, 16, jnp.float32, gate="strong", seed=32)
  t, h = 16 + 21, 2  # query row 21
  lf = np.asarray(inp.log_fgate).copy()
  lf[0, t, h] = np.nan
  inp = inp._replace(log_fgate=jnp.asarray(lf))
  got, _ = _run(impl, inp, Pruning(log_tolerance=-10.0) if pruned else None)
  o, lse = got["o"][0], got["lse"][0]  # [T, H, D], [H, T]
  later = np.arange(40) >= 21
  assert np.all(np.isnan(o[later, h])) and np.all(np.isnan(lse[h, later]))
  assert np.all(np.isfinite(o[~later, h])) and np.all(np.isfinite(lse[h, ~later]))
  others = np.arange(4) != h
  assert np.all(np.isfinite(o[:, others])) and np.all(np.isfinite(lse[others]))
  assert np.all(np.isnan(got["dlog_fgate"][0, t:, h]))
  assert np.any(np.isnan(got["dq"])) and np.any(np.isnan(got["dk"]))


def _huge_row_inputs() -> Inputs:
  """B=1, T=S=16, Hq=Hkv=2, D=4, f = 0 at position 6 of both heads. Every q, k element is
  finite, but one query row has |q| = 1e20, whose squared norm overflows float32:
  head 0: query 10 is 1e20 e_0 and keys are multiples of e_0: key 2 is +e_0 (logit +5e19),
    but it lies behind the zero gate and must get weight 0, which takes a floor F below
    -1e20; its own key (-e_0, logit -5e19) then takes all the weight (keys 6 to 9 are
    -2 e_0, logits -1e20: one weight 1, the others 0, which float64 resolves too);
  head 1: query 10 is 1e20 e_0 and key 12 is 1e20 e_1: every logit is finite (q_10 never
    sees key 12, and q_10 . k_j = 0 elsewhere), but U = |q_10| |k_12| / 2 = 5e39
    overflows float32."""
  T, D = 16, 4
  q = np.zeros((1, T, 2, D), np.float32)
  k = np.zeros((1, T, 2, D), np.float32)
  q[0, :, :, 0] = 0.1
  q[0, 10, :, 0] = 1e20
  k[0, :, 0, 0] = -1.0
  k[0, 2, 0, 0] = 1.0
  k[0, 6:10, 0, 0] = -2.0
  k[0, :, 1, 1] = 0.5
  k[0, 12, 1, 1] = 1e20
  rng = np.random.default_rng(33)
  v = rng.normal(size=(1, T, 2, D)).astype(np.float32)
  do = rng.normal(size=(1, T, 2, D)).astype(np.float32)
  lf = np.full((1, T, 2), -0.01, np.float32)
  lf[0, 6] = -np.inf
  return Inputs(*map(jnp.asarray, (q, k, v, lf)), None, jnp.asarray(do))


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_finite_rows_keep_zero_gates_exact_or_nan(impl):
  """A q row with finite elements but an overflowing squared norm still counts in U (it
  used to be dropped like a NaN row, so F came from the small rows and key 2 got all the
  weight of query 10: finite, wrong numbers). Where U itself overflows float32 (head 1),
  the queries that depend on the floor are NaN, never finite and wrong."""
  inp = _huge_row_inputs()
  got, _ = _run(impl, inp)
  expected = _expected_f64(inp)
  for name in ("o", "lse"):
    h0 = (slice(None), slice(None), 0) if name == "o" else (slice(None), 0)
    assert_close(got[name][h0], expected[name][h0], jnp.float32, f"{impl} {name} head 0")
  for name in ("dq", "dk", "dv", "dlog_fgate"):
    h0 = (slice(None), slice(None), 0)
    assert_close(got[name][h0], expected[name][h0], jnp.float32, f"{impl} {name} head 0")
  o1, lse1 = got["o"][0, :, 1], got["lse"][0, 1]
  assert_close(o1[:6], expected["o"][0, :6, 1], jnp.float32, f"{impl} o head 1 before the gate")
  if impl == "reference":  # it finds zero gates directly and needs no floor
    assert_close(o1, expected["o"][0, :, 1], jnp.float32, f"{impl} o head 1")
  else:
    assert np.all(np.isnan(o1[6:])) and np.all(np.isnan(lse1[6:]))

"""Adaptive Computation Pruning: the guarantee, exactness when nothing is prunable, tile counts.

The bounds checked here are derived in pallas_kernels/forgetting_attention/README.md
("ACP"). With eps = exp(log_tolerance), p the full softmax weights, m_i <= eps the pruned
mass of query i and A_i = max_j |dO_i . v_j| over the keys query i sees:

  |o'_i - o_i|                    <= 2 eps max|v|                      (every row, element)
  |dQ'_i - dQ_i|                  <= 6 eps scale A_i max_j |k_j|        (every row, element)
  sum_j |dK'_j - dK_j|            <= 6 eps scale sum_i A_i |q_i|        (every feature)
  sum_j |dV'_j - dV_j|            <= 2 eps sum_i |dO_i|                 (every feature)
  |dlog_f'_t - dlog_f_t|          <= 6 eps sum_{i >= t} A_i            (every position)

Float64 runs check them as stated; float32 kernels add their dtype's rounding allowance
(tests/tolerances.py) and check the summed bounds element-wise (each term of a sum is at
most the sum).
"""

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, Pruning, QKNormBound, forgetting_attention
from pallas_kernels.forgetting_attention import common, pruning, registry
from tests.kernel_utils import Inputs, make_inputs, reference_f64
from tests.tolerances import SCALAR_F32_RTOL, TOLERANCES, assert_close

BLOCKS = BlockSizes(block_q=32, block_k=32)


class Case(NamedTuple):
  B: int
  T: int
  S: int
  Hq: int
  Hkv: int
  D: int
  gate: str
  segments: int
  qk_scale: float
  log_eps: float
  bound: str  # "auto", "qknorm", "exact" (the float max |scale q.k|) or "reset" (adversarial)
  seed: int

  @property
  def id(self):
    seg = f"-SEG{self.segments}" if self.segments else ""
    return (f"B{self.B}-T{self.T}-S{self.S}-H{self.Hq}-HKV{self.Hkv}-D{self.D}-{self.gate}{seg}"
            f"-QK{self.qk_scale:g}-LOGEPS{self.log_eps:g}-{self.bound}")


CASES = [
    # Log-spread decay lengths, the default tolerance.
    Case(1, 256, 256, 4, 2, 32, "spread", 0, 1.0, -10.0, "auto", 0),
    # Large |q|, |k| (U ~ 50) with strong gates and a large tolerance.
    Case(1, 192, 192, 2, 1, 32, "strong", 0, 3.0, -2.0, "auto", 1),
    # Packed documents, GQA, a cache (S > T), a tiny tolerance.
    Case(2, 96, 160, 4, 2, 16, "strong", 3, 1.0, -30.0, "auto", 2),
    # The tightest legal U: the exact max |scale q.k|, on medium gates.
    Case(1, 160, 160, 2, 2, 32, "medium", 0, 1.0, -2.0, "exact", 3),
    # QK-norm inputs and the norm-scale bound.
    Case(1, 128, 128, 2, 1, 64, "strong", 0, 1.0, -10.0, "qknorm", 4),
    # One forget gate at just below delta: pruned weights near eps, errors near the bound.
    Case(1, 128, 128, 1, 1, 16, "reset", 0, 1.0, -2.0, "reset", 5),
]


def _rms_normed(x: np.ndarray, gamma: np.ndarray) -> np.ndarray:
  """gamma * x / rms(x) along the last axis: what a QK-norm layer feeds attention."""
  return gamma * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True))


def _reset_inputs(case: Case) -> tuple[Inputs, Pruning]:
  """Queries see their own keys at logits near -U and every key before position r near +U.

  log f is tiny except at r, where it is just below delta: all keys before r are pruned for
  the queries from r on, their weights sum to almost eps, and v is near +1 there and near -1
  from r on, so the output error comes close to 2 eps max|v|. U is the exact max |scale q.k|.
  """
  B, S, H, D = case.B, case.S, case.Hq, case.D
  rng = np.random.default_rng(case.seed)
  r = 3 * S // 4
  sign = np.where(np.arange(S) < r, 1.0, -1.0)[None, :, None, None]
  e1 = np.eye(D)[0]
  q = 2.0 * e1 + 0.05 * rng.normal(size=(B, S, H, D))
  k = sign * 2.0 * e1 + 0.05 * rng.normal(size=(B, S, H, D))
  v = sign + 0.05 * rng.normal(size=(B, S, H, D))
  q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
  qf, kf = q.astype(np.float64), k.astype(np.float64)
  u = float(np.abs(np.einsum("bthd,bshd->bhts", qf, kf)).max()) * D ** -0.5
  prune = Pruning(log_tolerance=case.log_eps, qk_bound=u)
  delta = case.log_eps - 2.0 * u - math.log(S)
  lf = -1e-3 * rng.uniform(size=(B, S, H))
  lf[:, r] = delta - 0.05
  do = rng.normal(size=(B, S, H, D))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return Inputs(f32(q), f32(k), f32(v), f32(lf), None, f32(do)), prune


@functools.lru_cache(maxsize=None)
def _case_inputs(case: Case) -> tuple[Inputs, Pruning]:
  if case.bound == "reset":
    return _reset_inputs(case)
  inp = make_inputs(case.B, case.T, case.S, case.Hq, case.Hkv, case.D, np.float32, gate=case.gate,
                    segments=case.segments, seed=case.seed, qk_scale=case.qk_scale)
  if case.bound == "auto":
    return inp, Pruning(log_tolerance=case.log_eps)
  if case.bound == "exact":
    q, k = np.asarray(inp.q, np.float64), np.asarray(inp.k, np.float64)
    k = np.repeat(k, case.Hq // case.Hkv, axis=2)
    u = float(np.max(np.abs(np.einsum("bthd,bshd->bhts", q, k)))) * case.D ** -0.5
    return inp, Pruning(log_tolerance=case.log_eps, qk_bound=u)
  rng = np.random.default_rng(case.seed + 100)
  gq = rng.uniform(0.5, 1.5, size=(case.Hq, case.D)).astype(np.float32)
  gk = rng.uniform(0.5, 1.5, size=(case.Hkv, case.D)).astype(np.float32)
  q = _rms_normed(np.asarray(inp.q), gq[None, None])
  k = _rms_normed(np.asarray(inp.k), gk[None, None])
  inp = inp._replace(q=jnp.asarray(q, jnp.float32), k=jnp.asarray(k, jnp.float32))
  return inp, Pruning(log_tolerance=case.log_eps,
                      qk_bound=QKNormBound(jnp.asarray(gq), jnp.asarray(gk)))


def _delta(inp: Inputs, prune: Pruning) -> np.ndarray:
  """The op's threshold [B, Hq] (checked on its own in test_threshold_*)."""
  scale = inp.q.shape[-1] ** -0.5
  return np.asarray(pruning.threshold(inp.q, inp.k, prune, scale), np.float64)


def _visible(T: int, S: int, seg: Optional[np.ndarray], B: int) -> np.ndarray:
  """[B, T, S] causal and same-segment pairs."""
  vis = (np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None])[None].repeat(B, 0)
  if seg is not None:
    vis = vis & (seg[:, S - T:, None] == seg[:, None, :])
  return vis


def _tiles_f64(lf, seg, T, bq, bk, delta):
  """Kept tiles [B, H, nq, nk] by the rule, in float64 with a loop over tiles.

  A tile is live when one of its (query, key) pairs is causal and in one segment; it is kept
  when it is live and its corner decay c[first query] - c[last key] is >= delta (0 for tiles
  that reach the diagonal). Also returns the largest decay of a live pair per tile, for the
  check that no pruned tile holds a pair at or above delta.
  """
  lf = np.asarray(lf, np.float64)
  B, S, H = lf.shape
  c = np.cumsum(lf, axis=1)  # [B, S, H]
  vis = _visible(T, S, seg, B)
  decay = c[:, S - T:, None, :] - c[:, None, :, :]  # [B, T, S, H]
  nq, nk = -(-T // bq), -(-S // bk)
  kept = np.zeros((B, H, nq, nk), bool)
  best = np.full((B, H, nq, nk), -np.inf)
  for a in range(nq):
    rows = slice(a * bq, min((a + 1) * bq, T))
    q_first = S - T + a * bq
    for b in range(nk):
      cols = slice(b * bk, min((b + 1) * bk, S))
      k_last = min((b + 1) * bk, S) - 1
      live = vis[:, rows, cols].any(axis=(1, 2))  # [B]
      corner = np.zeros((B, H)) if k_last >= q_first else c[:, q_first] - c[:, k_last]
      keep = live[:, None] if delta is None else live[:, None] & (corner >= delta)
      kept[:, :, a, b] = keep
      d = np.where(vis[:, rows, cols, None], decay[:, rows, cols], -np.inf)
      best[:, :, a, b] = d.max(axis=(1, 2))
  return kept, best


def _masked_f64(inp: Inputs, keep: np.ndarray):
  """Output and gradients in float64 of attention restricted to ``keep`` [B, H, T, S]."""
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    B, T, Hq, D = inp.q.shape
    S, Hkv = inp.k.shape[1], inp.k.shape[2]
    seg = None if inp.segment_ids is None else np.asarray(inp.segment_ids)
    mask = jnp.asarray(keep & _visible(T, S, seg, B)[:, None])

    def f(q, k, v, lf):
      k = jnp.repeat(k, Hq // Hkv, axis=2)
      v = jnp.repeat(v, Hq // Hkv, axis=2)
      c = jnp.cumsum(lf, axis=1).transpose(0, 2, 1)  # [B, H, S]
      s = D ** -0.5 * jnp.einsum("bthd,bshd->bhts", q, k) + c[:, :, S - T:, None] - c[:, :, None, :]
      p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
      return jnp.einsum("bhts,bshd->bthd", p, v)

    o, vjp = jax.vjp(f, *map(f64, (inp.q, inp.k, inp.v, inp.log_fgate)))
    dq, dk, dv, dlf = vjp(f64(inp.do))
    return {name: np.asarray(x) for name, x in
            zip(("o", "dq", "dk", "dv", "dlog_fgate"), (o, dq, dk, dv, dlf))}


def _tile_mask(kept: np.ndarray, T: int, S: int, bq: int, bk: int) -> np.ndarray:
  """[B, H, nq, nk] tiles -> [B, H, T, S] pairs."""
  return kept.repeat(bq, axis=2)[:, :, :T].repeat(bk, axis=3)[:, :, :, :S]


def _bounds(inp: Inputs, eps: float) -> dict:
  """The right-hand sides of the bounds in the module docstring, per element, float64."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (inp.q, inp.k, inp.v, inp.do))
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  g = Hq // Hkv
  scale = D ** -0.5
  seg = None if inp.segment_ids is None else np.asarray(inp.segment_ids)
  vis = _visible(T, S, seg, B)[:, None]  # [B, 1, T, S]
  kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # [B, S, Hq, D]
  dov = np.abs(np.einsum("bthd,bshd->bhts", do, vr))
  A = np.where(vis, dov, 0.0).max(axis=-1)  # [B, Hq, T]
  vmax = np.abs(vr).max(axis=(1, 3))  # [B, Hq]
  kmax = np.abs(kr).max(axis=1)  # [B, Hq, D]
  group_sum = lambda x: x.reshape(B, Hkv, g, D).sum(axis=2)  # [B, Hq, D] -> [B, Hkv, D]
  dk_l1 = group_sum(6 * eps * scale * np.einsum("bht,bthd->bhd", A, np.abs(q)))
  dv_l1 = group_sum(2 * eps * np.abs(do).sum(axis=1))
  # sum over queries at absolute positions >= t of A: a reverse cumsum over positions.
  A_pos = np.zeros((B, Hq, S))
  A_pos[:, :, S - T:] = A
  dlf = 6 * eps * np.cumsum(A_pos[:, :, ::-1], axis=-1)[:, :, ::-1].transpose(0, 2, 1)
  return {
      "o": np.broadcast_to(2 * eps * vmax[:, None, :, None], q.shape),
      "dq": 6 * eps * scale * A.transpose(0, 2, 1)[..., None] * kmax[:, None],
      "dk_l1": dk_l1, "dv_l1": dv_l1, "dlog_fgate": dlf,
  }


def _check_guarantee(got: dict, full: dict, inp: Inputs, eps: float, allowance: float):
  """got vs the float64 unpruned ``full`` within the ACP bounds, plus a relative allowance.

  With allowance 0 (float64) the summed dK / dV bounds are checked as sums; with a rounding
  allowance they are checked element-wise.
  """
  bd = _bounds(inp, eps)
  for name in ("o", "dq", "dlog_fgate"):
    err = np.abs(got[name] - full[name])
    slack = bd[name] + allowance * np.abs(full[name]).max() + 1e-12
    worst = np.max(err - slack)
    assert worst <= 0, f"{name}: error exceeds the ACP bound by {worst:.3g}"
  for name in ("dk", "dv"):
    err = np.abs(got[name] - full[name])  # [B, S, Hkv, D]
    l1 = bd[name + "_l1"][:, None]  # [B, 1, Hkv, D]
    if allowance == 0:
      err = err.sum(axis=1, keepdims=True)
    slack = l1 + allowance * np.abs(full[name]).max() + 1e-12
    worst = np.max(err - slack)
    assert worst <= 0, f"{name}: error exceeds the ACP bound by {worst:.3g}"


@functools.lru_cache(maxsize=None)
def _full_f64(case: Case) -> dict:
  inp, _ = _case_inputs(case)
  return reference_f64(inp)


@functools.lru_cache(maxsize=None)
def _tiles(case: Case, bq: int, bk: int):
  inp, prune = _case_inputs(case)
  seg = None if inp.segment_ids is None else np.asarray(inp.segment_ids)
  return _tiles_f64(inp.log_fgate, seg, case.T, bq, bk, _delta(inp, prune))


def _op_grads(inp: Inputs, prune: Optional[Pruning], impl: str, blocks=BLOCKS, interpret=False):
  """Output, gradients of sum(o * do), and stats of the public op, as float64 numpy."""

  def f(q, k, v, lf):
    return forgetting_attention(q, k, v, lf, segment_ids=inp.segment_ids, pruning=prune, impl=impl,
                                block_sizes=blocks, interpret=interpret, return_stats=True)

  o, vjp, stats = jax.vjp(jax.jit(f), inp.q, inp.k, inp.v, inp.log_fgate, has_aux=True)
  dq, dk, dv, dlf = vjp(inp.do.astype(o.dtype))
  out = {name: np.asarray(x, np.float64) for name, x in
         zip(("o", "dq", "dk", "dv", "dlog_fgate"), (o, dq, dk, dv, dlf))}
  return out, stats


# ------------------------------------------------------------------ the threshold and U


def test_threshold_auto_bounds_every_logit_without_gradient():
  inp = make_inputs(2, 40, 56, 4, 2, 24, jnp.bfloat16, seed=7, qk_scale=3.0)
  prune = Pruning(log_tolerance=-7.0)
  scale = 0.3
  q = np.asarray(inp.q, np.float64)
  k = np.repeat(np.asarray(inp.k, np.float64), 2, axis=2)
  logits = scale * np.abs(np.einsum("bthd,bshd->bhts", q, k)).max(axis=(2, 3))  # [B, Hq]
  u = np.asarray(pruning.qk_bound(inp.q, inp.k, prune, scale), np.float64)
  norms = scale * np.linalg.norm(q, axis=-1).max(1) * np.linalg.norm(k, axis=-1).max(1)
  assert np.all(u >= logits) and np.all(u >= norms) and np.all(u <= norms * (1 + 1e-4))
  delta = np.asarray(pruning.threshold(inp.q, inp.k, prune, scale), np.float64)
  np.testing.assert_allclose(delta, -7.0 - 2 * u - math.log(56), rtol=SCALAR_F32_RTOL)
  grad = jax.grad(lambda q: pruning.threshold(q, inp.k, prune, scale).sum())(inp.q)
  assert not np.any(np.asarray(grad, np.float32))
  # A negative scale flips the logits' signs, not their magnitudes.
  np.testing.assert_array_equal(np.asarray(pruning.threshold(inp.q, inp.k, prune, -scale)),
                                np.asarray(pruning.threshold(inp.q, inp.k, prune, scale)))


def test_threshold_auto_bounds_logits_of_extreme_rows():
  """"auto" U bounds every logit for rows whose squares leave float32 (elements of 2e-20
  square to denormals that flush to zero: U came out 0 under logits of 0.3), stays finite
  and a bound for finite rows whose squared norm overflows (1e20), and where U itself
  overflows float32 the threshold is -inf: prune nothing, never a finite wrong delta."""
  q = np.full((1, 8, 3, 16), 0.5, np.float32)
  k = np.full((1, 8, 3, 16), 0.5, np.float32)
  q[0, :, 0] = 2e-20  # head 0: tiny q against large k
  k[0, 3, 0] = 4e18
  q[0, 5, 1, 0] = 1e20  # head 1: one huge finite q element, ordinary k
  q[0, 5, 2, 0] = 1e20  # head 2: huge q and k elements, |q| |k| / 4 = 2.5e39
  k[0, 6, 2, 1] = 1e20
  scale = 0.25
  q64, k64 = q.astype(np.float64), k.astype(np.float64)
  logits = scale * np.abs(np.einsum("bthd,bshd->bhts", q64, k64)).max(axis=(2, 3))  # [B, H]
  norms = scale * np.linalg.norm(q64, axis=-1).max(1) * np.linalg.norm(k64, axis=-1).max(1)
  prune = Pruning(log_tolerance=-7.0)
  u = np.asarray(pruning.qk_bound(jnp.asarray(q), jnp.asarray(k), prune, scale), np.float64)
  assert np.all(u[0, :2] >= logits[0, :2]) and np.all(u[0, :2] >= norms[0, :2])
  assert np.all(u[0, :2] <= norms[0, :2] * (1 + 1e-4)) and logits[0, 0] > 0.3
  assert u[0, 2] == np.inf
  delta = np.asarray(pruning.threshold(jnp.asarray(q), jnp.asarray(k), prune, scale))
  np.testing.assert_allclose(delta[0, :2], -7.0 - 2 * u[0, :2] - math.log(8),
                             rtol=SCALAR_F32_RTOL)
  assert delta[0, 2] == -np.inf


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: np.dtype(d).name)
def test_threshold_qknorm_bounds_normalised_inputs(dtype):
  rng = np.random.default_rng(3)
  gq = rng.uniform(0.2, 2.0, size=(4, 32)).astype(np.float32)
  gk = rng.uniform(0.2, 2.0, size=(32,)).astype(np.float32)
  # Every q_t parallel to gamma_q's largest entry: |q_t| reaches sqrt(d) max|gamma_q|.
  x = rng.normal(size=(1, 16, 4, 32)) * 0.01
  x[..., 0] += 100.0
  gq[:, 0] = gq.max()
  gk[0] = gk.max()
  q = jnp.asarray(_rms_normed(x, gq[None, None]), dtype)
  k = jnp.asarray(_rms_normed(x[:, :, :2], gk), dtype)
  prune = Pruning(qk_bound=QKNormBound(jnp.asarray(gq), jnp.asarray(gk)))
  u = np.asarray(pruning.qk_bound(q, k, prune, 32 ** -0.5), np.float64)
  qf = np.asarray(q, np.float64)
  kf = np.repeat(np.asarray(k, np.float64), 2, axis=2)
  logits = 32 ** -0.5 * np.abs(np.einsum("bthd,bshd->bhts", qf, kf)).max(axis=(2, 3))
  assert np.all(u >= logits)
  assert np.all(logits >= 0.9 * u), "the test inputs should come close to the bound"
  explicit = pruning.qk_bound(q, k, Pruning(qk_bound=2.5), 1.0)
  np.testing.assert_array_equal(np.asarray(explicit), np.full((1, 4), 2.5, np.float32))


def test_stats_helpers():
  stats = common.AttentionStats(jnp.zeros((2, 3, 5)), jnp.asarray([[1, 2, 3], [4, 5, 6]]),
                                jnp.full((2, 3), 6))
  assert float(stats.kept_fraction()) == pytest.approx(21 / 36)
  np.testing.assert_allclose(np.asarray(stats.kept_fraction(per_head=True)),
                             np.asarray([[1, 2, 3], [4, 5, 6]]) / 6)
  assert stats.tile_summary() == "kept 21 of 36 tiles (58.3%)"
  with pytest.raises(ValueError, match="not 'reference'"):
    common.AttentionStats(jnp.zeros((2, 3, 5))).kept_fraction()


# ------------------------------------------------------------------ tile ranges and counts


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _ranges(log_fgate, segment_ids, T, bq, bk, delta):
  c_hi, c_lo = common.compensated_cumsum(log_fgate, axis=1)
  return pruning.tile_ranges(c_hi, c_lo, segment_ids, T, bq, bk, delta)


@pytest.mark.parametrize("T,S,bq,bk,segments,gate", [
    (200, 200, 32, 32, 0, "strong"),
    (111, 173, 16, 32, 4, "spread"),
    (130, 130, 64, 16, 3, "medium"),
    (1, 77, 16, 16, 2, "strong"),
], ids=lambda x: str(x))
def test_tile_ranges_match_float64_count(T, S, bq, bk, segments, gate):
  """Forward and mirrored ranges hold exactly the tiles the rule keeps; no pruned tile holds
  a live pair at or above delta."""
  inp = make_inputs(2, T, S, 4, 2, 16, np.float32, gate=gate, segments=segments, seed=T + S,
                    qk_scale=0.5)
  seg = None if inp.segment_ids is None else np.asarray(inp.segment_ids)
  live = None  # tiles kept by the causal and segment structure alone (the unpruned pass)
  for prune in (None, Pruning(log_tolerance=-4.0)):
    delta = None if prune is None else _delta(inp, prune)
    expected, best = _tiles_f64(inp.log_fgate, seg, T, bq, bk, delta)
    r = _ranges(inp.log_fgate, inp.segment_ids, T, bq, bk,
                None if delta is None else jnp.asarray(delta, jnp.float32))
    nq, nk = expected.shape[2:]
    a, b = np.arange(nq)[:, None], np.arange(nk)[None, :]
    kv_s, kv_e = np.asarray(r.kv_start)[..., None], np.asarray(r.kv_end)[..., None]
    q_s, q_e = np.asarray(r.q_start)[..., None, :], np.asarray(r.q_end)[..., None, :]
    np.testing.assert_array_equal((kv_s <= b) & (b < kv_e), expected)
    np.testing.assert_array_equal((q_s <= a) & (a < q_e), expected)
    np.testing.assert_array_equal(np.asarray(r.kept_tiles()), expected.sum(axis=(2, 3)))
    if delta is None:
      live = expected
    else:
      below = best < delta[:, :, None, None]  # -inf (no live pair) is below too
      assert np.all(below[~expected]), "a pruned tile holds a live pair at or above delta"
      assert np.any(live & ~expected), "the case should prune some live tile"


# ------------------------------------------------------------------ the guarantee

BLOCKWISE = ["xla", "pallas_gpu"]


def _eps(prune: Pruning) -> float:
  return math.exp(prune.log_tolerance)


def _assert_near_bound(got: dict, full: dict, eps: float, vmax: float):
  """The adversarial case must bring the output error close to 2 eps max|v|."""
  err = np.max(np.abs(got["o"] - full["o"]))
  assert err >= 0.4 * 2 * eps * vmax, f"output error {err:.3g} is far below the bound"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_guarantee_reference_elementwise_and_tiles(case):
  """Float64: the element-wise rule and the tile rule both stay within the bounds."""
  inp, prune = _case_inputs(case)
  full = _full_f64(case)
  with jax.enable_x64(True):
    inp64 = Inputs(*(None if x is None else (x if x.dtype == jnp.int32 else
                                             jnp.asarray(np.asarray(x, np.float64))) for x in inp))
    elementwise, _ = _op_grads(inp64, prune, "reference")
  kept, _ = _tiles(case, BLOCKS.block_q, BLOCKS.block_k)
  tiles = _masked_f64(inp, _tile_mask(kept, case.T, case.S, BLOCKS.block_q, BLOCKS.block_k))
  for got in (elementwise, tiles):
    _check_guarantee(got, full, inp, _eps(prune), allowance=0.0)
  if case.bound == "reset":
    vmax = np.abs(np.asarray(inp.v)).max()
    for got in (elementwise, tiles):
      _assert_near_bound(got, full, _eps(prune), vmax)


def _pruned_f64(case: Case) -> dict:
  """The function every implementation computes with pruning on, in float64: the
  reference's element-wise pruned mode (tiles only decide what is skipped)."""
  inp, prune = _case_inputs(case)
  return reference_f64(inp, prune_threshold=_delta(inp, prune))


@pytest.mark.parametrize("impl", BLOCKWISE)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_guarantee_blockwise(impl, case):
  """Output and gradients within the bounds of the unpruned float64 result; the pruned
  function computed to float32 accuracy; the kept-tile count equal to the float64 count."""
  inp, prune = _case_inputs(case)
  got, stats = _op_grads(inp, prune, impl, interpret=impl == "pallas_gpu")
  _check_guarantee(got, _full_f64(case), inp, _eps(prune), allowance=TOLERANCES["float32"][1])
  expected = _pruned_f64(case)
  for name in ("o", "dq", "dk", "dv", "dlog_fgate"):
    assert_close(got[name], expected[name], jnp.float32, name)
  kept, _ = _tiles(case, BLOCKS.block_q, BLOCKS.block_k)
  np.testing.assert_array_equal(np.asarray(stats.kept_tiles), kept.sum(axis=(2, 3)))
  total = pruning.causal_tiles(case.T, case.S, BLOCKS.block_q, BLOCKS.block_k)
  np.testing.assert_array_equal(np.asarray(stats.total_tiles), total)
  if case.bound == "reset":
    _assert_near_bound(got, _full_f64(case), _eps(prune), np.abs(np.asarray(inp.v)).max())


@pytest.mark.parametrize("impl", BLOCKWISE)
def test_nothing_prunable_is_bitwise_unpruned(impl):
  """Weak gates: no tile is prunable, so pruning must change no bit of any result."""
  inp = make_inputs(2, 100, 130, 4, 2, 32, jnp.bfloat16, gate="weak", segments=2, seed=11)
  interpret = impl == "pallas_gpu"
  on, on_stats = _op_grads(inp, Pruning(log_tolerance=-2.0), impl, interpret=interpret)
  off, off_stats = _op_grads(inp, None, impl, interpret=interpret)
  for name in on:
    np.testing.assert_array_equal(on[name], off[name], err_msg=name)
  np.testing.assert_array_equal(np.asarray(on_stats.lse), np.asarray(off_stats.lse))
  np.testing.assert_array_equal(np.asarray(on_stats.kept_tiles), np.asarray(off_stats.kept_tiles))


@pytest.mark.parametrize("impl", BLOCKWISE)
def test_strong_gates_prune_most_tiles(impl):
  """Most tiles are pruned, the count says so exactly, and the output stays within the bound."""
  inp = make_inputs(1, 512, 512, 2, 1, 32, jnp.float32, gate="strong", seed=12)
  prune = Pruning(log_tolerance=-10.0)
  op = jax.jit(functools.partial(forgetting_attention, pruning=prune, impl=impl, block_sizes=BLOCKS,
                                 interpret=impl == "pallas_gpu", return_stats=True))
  o, stats = op(inp.q, inp.k, inp.v, inp.log_fgate)
  expected, _ = _tiles_f64(inp.log_fgate, None, 512, 32, 32, _delta(inp, prune))
  np.testing.assert_array_equal(np.asarray(stats.kept_tiles), expected.sum(axis=(2, 3)))
  assert float(stats.kept_fraction()) < 0.3, stats.tile_summary()
  np.testing.assert_allclose(np.asarray(stats.kept_fraction(per_head=True)),
                             expected.sum(axis=(2, 3)) / pruning.causal_tiles(512, 512, 32, 32),
                             rtol=SCALAR_F32_RTOL)
  full = reference_f64(inp, grads=False)["o"]
  bound = 2 * _eps(prune) * np.abs(np.asarray(inp.v, np.float64)).max()
  err = np.abs(np.asarray(o, np.float64) - full)
  assert np.max(err) <= bound + TOLERANCES["float32"][1] * np.abs(full).max()


@pytest.mark.parametrize("impl", BLOCKWISE)
def test_pruned_cache_gets_exactly_zero_gradient(impl):
  """A gate just below delta at the first query prunes every cached key's tile: those keys
  carry weights ~exp(delta), far from zero in float32, yet must get dK = dV = 0 exactly, and
  the output must be attention over the last T keys."""
  T, S = 64, 160
  inp = make_inputs(1, T, S, 2, 1, 32, jnp.float32, gate="weak", seed=13)
  prune = Pruning(log_tolerance=-10.0)
  lf = np.asarray(inp.log_fgate).copy()
  lf[:, S - T] = _delta(inp, prune).min() - 1.0
  inp = inp._replace(log_fgate=jnp.asarray(lf))
  unpruned, _ = _op_grads(inp, None, impl, interpret=impl == "pallas_gpu")
  assert np.all(np.abs(unpruned["dv"][:, :S - T]).max(axis=-1) > 0)
  got, stats = _op_grads(inp, prune, impl, interpret=impl == "pallas_gpu")
  assert not np.any(got["dk"][:, :S - T]) and not np.any(got["dv"][:, :S - T])
  np.testing.assert_array_equal(np.asarray(stats.kept_tiles), pruning.causal_tiles(T, T, 32, 32))
  recent = inp._replace(k=inp.k[:, S - T:], v=inp.v[:, S - T:], log_fgate=inp.log_fgate[:, S - T:])
  assert_close(got["o"], reference_f64(recent, grads=False)["o"], jnp.float32, "o")


# ------------------------------------------------------------------ non-finite input

NAN_TILES = {"reference": BLOCKS, "xla": BlockSizes(16, 16), "pallas_gpu": BlockSizes(16, 16),
             "pallas_tpu": BlockSizes(16, 128)}


def _nan_inputs():
  """Strong gates (most tiles prunable), a cache of 16 keys, GQA."""
  return make_inputs(1, 48, 64, 2, 1, 16, jnp.float32, gate="strong", seed=21)


@pytest.mark.parametrize("impl", registry.IMPLS)
def test_nan_query_with_pruning_is_nan_not_zero(impl):
  """A NaN in q makes the "auto" bound of its head NaN. That head must then prune nothing (as
  if pruning were off): the query's row is NaN, every other row is the unpruned result, the
  other head is pruned as usual, and the gradients are not silently finite."""
  inp = _nan_inputs()
  row, head = 20, 1
  q = np.asarray(inp.q).copy()
  q[0, row, head, 3] = np.nan
  inp = inp._replace(q=jnp.asarray(q))
  prune = Pruning(log_tolerance=-10.0)
  got, stats = _op_grads(inp, prune, impl, blocks=NAN_TILES[impl],
                         interpret=impl.startswith("pallas"))
  lse = np.array(stats.lse)
  assert np.all(np.isnan(got["o"][0, row, head])) and np.isnan(lse[0, head, row])
  assert np.all(np.isnan(got["dq"][0, row, head]))
  # The expected function: head 0 pruned at its threshold, head 1 not pruned at all.
  clean = inp._replace(q=jnp.asarray(np.nan_to_num(q)))
  delta = _delta(clean, prune).copy()
  delta[0, head] = -np.inf
  expected = reference_f64(clean, prune_threshold=delta, grads=False)
  o, ref_o, ref_lse = got["o"].copy(), expected["o"].copy(), expected["lse"].copy()
  o[0, row, head] = ref_o[0, row, head] = 0.0
  lse[0, head, row] = ref_lse[0, head, row] = 0.0
  assert_close(o, ref_o, jnp.float32, "o")
  assert_close(lse, ref_lse, jnp.float32, "lse")


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_gpu"])
def test_nan_key_is_never_pruned_away(impl):
  """With a bound that does not look at q and k (a float), a NaN key in the cache lies in
  tiles that the gates alone would prune for every query. Non-finite q or k must switch
  pruning off for the head instead: every query sees that key, so every row is NaN."""
  inp = _nan_inputs()
  k = np.asarray(inp.k).copy()
  k[0, 2, 0, 5] = np.nan
  inp = inp._replace(k=jnp.asarray(k))
  got, stats = _op_grads(inp, Pruning(log_tolerance=-10.0, qk_bound=5.0), impl,
                         blocks=NAN_TILES[impl], interpret=impl.startswith("pallas"))
  assert np.all(np.isnan(got["o"])) and np.all(np.isnan(np.asarray(stats.lse)))


def test_tile_ranges_keep_nan_decay_and_nan_threshold():
  """A NaN corner decay or a NaN threshold keeps a tile (the compare must not drop NaN)."""
  T = S = 96
  inp = make_inputs(1, T, S, 2, 1, 16, np.float32, gate="strong", seed=22)
  lf = np.asarray(inp.log_fgate).copy()
  unpruned = _ranges(jnp.asarray(lf), None, T, 16, 16, None)
  delta = jnp.asarray([[-30.0, np.nan]], jnp.float32)
  r = _ranges(jnp.asarray(lf), None, T, 16, 16, delta)
  assert np.sum(np.asarray(r.kept_tiles())[0, 0]) < np.sum(np.asarray(unpruned.kept_tiles())[0, 0])
  for a, b in zip(r, unpruned):
    np.testing.assert_array_equal(np.asarray(a)[:, 1], np.asarray(b)[:, 1])
  lf[0, 40, 0] = np.nan  # c is NaN from position 40 on: q blocks 3.. keep every causal tile
  r = _ranges(jnp.asarray(lf), None, T, 16, 16, jnp.full((1, 2), -30.0, jnp.float32))
  np.testing.assert_array_equal(np.asarray(r.kv_start)[0, 0, 3:], 0)
  np.testing.assert_array_equal(np.asarray(r.kv_end)[0, 0, 3:], np.asarray(unpruned.kv_end)[0, 0, 3:])

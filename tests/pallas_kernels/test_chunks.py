"""The chunk kernels of every implementation that has them (``registry.chunk_impls``) on chunk
pairs at arbitrary global positions, against float64 formulas written here from the chunk
contract (``xla.forward_chunk``, ``row_terms_chunk``, ``backward_chunk``).

A sequence of N = 512 tokens; each case takes a query chunk and a key chunk of 128 tokens at
the positions a sequence-parallel layout gives a device (contiguous chunks, zigzag's two
runs, striped positions d + P i), including the device's own chunk (its own keys: the
diagonal), a key chunk entirely after the queries (every pair masked: lse = -inf, o = 0,
all gradients 0, no NaN) and one entirely before them (every pair visible), with segment
ids, with an ACP threshold, and under strong forgetting (log f < -8, where dq hinges on the
exact g and the anchored dS). The float64 reference builds the [T, S] mask from the
positions; the row terms and the backward get the global lse and g_b of the whole sequence,
rounded to float32 like the kernels' inputs, and the reference uses those same values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.forgetting_attention import common, pruning, registry
from pallas_kernels.forgetting_attention.common import Cols, Rows
from tests.kernel_utils import interpret_for, make_log_fgate, make_segments
from tests.tolerances import assert_close

N, L, P = 512, 128, 4  # sequence, chunk, devices of the layouts
B, HQ, HKV, D = 1, 2, 1, 32
SCALE = D ** -0.5
IMPLS = registry.chunk_impls()


def _contiguous(d):
  return np.arange(d * L, (d + 1) * L)


def _zigzag(d):  # chunks d and 2P - 1 - d of 2P
  half = N // (2 * P)
  return np.concatenate([np.arange(d * half, (d + 1) * half),
                         np.arange((2 * P - 1 - d) * half, (2 * P - d) * half)])


def _striped(d):
  return d + P * np.arange(L)


# name -> (query positions, key positions)
PAIRS = {
    "own_contiguous": (_contiguous(2), _contiguous(2)),
    "later_vs_earlier": (_contiguous(3), _contiguous(1)),
    "after_all_masked": (_contiguous(0), _contiguous(2)),
    "zigzag_own": (_zigzag(1), _zigzag(1)),
    "zigzag_other": (_zigzag(1), _zigzag(2)),
    "striped_other": (_striped(1), _striped(2)),
    "striped_own": (_striped(3), _striped(3)),
    # The first query block starts at the last key of a kv block (its own key).
    "straddling": (np.arange(215, 343), np.arange(136, 264)),
}


def _sequence(gate, segments, seed):
  rng = np.random.default_rng(seed)
  x = {"q": rng.normal(size=(B, N, HQ, D)), "k": rng.normal(size=(B, N, HKV, D)),
       "v": rng.normal(size=(B, N, HKV, D)), "do": rng.normal(size=(B, N, HQ, D)),
       "dlse": rng.normal(size=(B, HQ, N))}
  x = {n: np.asarray(a, np.float32) for n, a in x.items()}
  x["log_fgate"] = make_log_fgate(rng, B, N, HQ, gate)
  x["seg"] = make_segments(rng, B, N, segments) if segments else None
  return x


def _logits(x, c64, qpos, kpos, delta):
  """float64 logits [B, Hq, T, S], the visibility mask and the own-key diagonal [T, S]."""
  k = np.repeat(x["k"][:, kpos].astype(np.float64), HQ // HKV, axis=2)
  q = x["q"][:, qpos].astype(np.float64)
  decay = c64[:, :, qpos, None] - c64[:, :, None, kpos]  # [B, Hq, T, S]
  s = SCALE * np.einsum("bthd,bshd->bhts", q, k) + decay
  mask = np.broadcast_to(qpos[:, None] >= kpos[None, :], s.shape)
  if x["seg"] is not None:
    same = x["seg"][:, qpos, None] == x["seg"][:, None, kpos]  # [B, T, S]
    mask = mask & same[:, None]
  if delta is not None:
    mask = mask & ~(decay < np.asarray(delta, np.float64)[:, :, None, None])
  return s, mask, qpos[:, None] == kpos[None, :]


def _lse(s, mask):
  m = np.max(np.where(mask, s, -np.inf), axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return np.log(np.sum(np.exp(np.where(mask, s - m, -np.inf)), axis=-1)) + m[..., 0]


def _case(gate, segments, pruned, seed):
  """The sequence, its float64 c, the global lse and g_b (float32, as a ring passes them),
  dd and the ACP threshold."""
  x = _sequence(gate, segments, seed)
  c64 = np.cumsum(x["log_fgate"].astype(np.float64), axis=1).transpose(0, 2, 1)  # [B, Hq, N]
  c_hi, c_lo = common.compensated_cumsum(jnp.asarray(x["log_fgate"]), axis=1)
  delta = None
  if pruned:
    delta = np.asarray(pruning.threshold(jnp.asarray(x["q"]), jnp.asarray(x["k"]),
                                         pruning.Pruning(log_tolerance=-10.0), SCALE,
                                         num_keys=N))
  dd = np.asarray(common.own_key_dot(jnp.asarray(x["do"]), jnp.asarray(x["v"])))  # [B, Hq, N]
  everything = np.arange(N)
  s, mask, diag = _logits(x, c64, everything, everything, delta)
  lse = _lse(s, mask)
  p = np.exp(np.where(mask, s - lse[..., None], -np.inf))
  dp = np.einsum("bthd,bshd->bhts", x["do"].astype(np.float64),
                 np.repeat(x["v"].astype(np.float64), HQ // HKV, axis=2))
  xx = np.where(diag, 0.0, dp - dd.astype(np.float64)[..., None])
  g = np.sum(p * xx, axis=-1)
  return dict(x=x, c64=c64, c_hi=np.asarray(c_hi), c_lo=np.asarray(c_lo), delta=delta, dd=dd,
              lse=lse.astype(np.float32), g_b=(g - x["dlse"]).astype(np.float32))


def _expected(case, qpos, kpos):
  """The chunk contract in float64 on the float32 inputs the kernels get."""
  x = case["x"]
  s, mask, diag = _logits(x, case["c64"], qpos, kpos, case["delta"])
  f64 = lambda a: np.asarray(a, np.float64)
  v = np.repeat(f64(x["v"][:, kpos]), HQ // HKV, axis=2)  # [B, S, Hq, D]
  k = np.repeat(f64(x["k"][:, kpos]), HQ // HKV, axis=2)
  q, do = f64(x["q"][:, qpos]), f64(x["do"][:, qpos])
  lse_c = _lse(s, mask)
  w = np.exp(np.where(mask, s - np.where(np.isfinite(lse_c), lse_c, 0.0)[..., None], -np.inf))
  o = np.einsum("bhts,bshd->bthd", w, v)
  lse, dd, g_b = (f64(case[n][:, :, qpos]) for n in ("lse", "dd", "g_b"))
  p = np.exp(np.where(mask, s - lse[..., None], -np.inf))
  xx = np.where(diag, 0.0, np.einsum("bthd,bshd->bhts", do, v) - dd[..., None])
  ds = p * (xx - g_b[..., None])
  group = lambda a: a.reshape(B, a.shape[1], HKV, HQ // HKV, D).sum(axis=3)  # GQA heads
  return dict(
      o=o, lse=lse_c, g=np.sum(p * xx, axis=-1), r=np.sum(np.where(diag, 0.0, p), axis=-1),
      dq=SCALE * np.einsum("bhts,bshd->bthd", ds, k),
      dk=group(SCALE * np.einsum("bhts,bthd->bshd", ds, q)),
      dv=group(np.einsum("bhts,bthd->bshd", p, do)),
      dc=-np.sum(np.where(diag, 0.0, ds), axis=2).transpose(0, 2, 1))


def _chunks(case, qpos, kpos):
  x = case["x"]
  seg = x["seg"]
  at = lambda a, pos: jnp.asarray(a[:, pos])
  rows = Rows(at(x["q"], qpos), at(case["c_hi"], qpos), at(case["c_lo"], qpos),
              None if seg is None else at(seg, qpos), jnp.asarray(qpos, jnp.int32))
  cols = Cols(at(x["k"], kpos), at(x["v"], kpos), at(case["c_hi"], kpos), at(case["c_lo"], kpos),
              None if seg is None else at(seg, kpos), jnp.asarray(kpos, jnp.int32))
  return rows, cols


@functools.lru_cache(maxsize=None)
def _kernels(impl):
  """The three chunk kernels of ``impl`` as one jitted function (positions are arguments, so
  every pair of the same shapes shares the compiled program)."""
  mod = registry.module(impl)
  kw = dict(sm_scale=SCALE, block_sizes=registry.REGISTRY[impl].small_tiles,
            interpret=interpret_for(impl))

  @jax.jit
  def run(rows, cols, delta, do, lse, dd, g_b):
    o, lse_c, kept = mod.forward_chunk(rows, cols, delta, **kw)
    g, r = mod.row_terms_chunk(rows, cols, do, lse, dd, delta, **kw)
    dq, dk, dv, dc = mod.backward_chunk(rows, cols, do, lse, dd, g_b, delta, **kw)
    return dict(o=o, lse=lse_c, kept=kept, g=g, r=r, dq=dq, dk=dk, dv=dv, dc=dc)

  return run


def _check_pair(impl, case, name, what):
  qpos, kpos = PAIRS[name]
  rows, cols = _chunks(case, qpos, kpos)
  sl = lambda n: jnp.asarray(case[n][:, :, qpos])
  delta = None if case["delta"] is None else jnp.asarray(case["delta"])
  got = _kernels(impl)(rows, cols, delta, jnp.asarray(case["x"]["do"][:, qpos]), sl("lse"),
                       sl("dd"), sl("g_b"))
  want = _expected(case, qpos, kpos)
  tag = f"{impl} {what} {name}"
  for n in ("o", "g", "r", "dq", "dk", "dv", "dc"):
    a = np.asarray(got[n])
    assert a.dtype == np.float32 and a.shape == want[n].shape, (tag, n, a.dtype, a.shape)
    if not np.any(want[n]):  # nothing visible: exact zeros
      np.testing.assert_array_equal(a, 0.0, err_msg=f"{tag} {n}")
    else:
      assert_close(a, want[n], np.float32, f"{tag} {n}")
  lse = np.asarray(got["lse"])
  none = np.isneginf(want["lse"])
  np.testing.assert_array_equal(np.isneginf(lse), none, err_msg=f"{tag} lse -inf")
  if not np.all(none):
    assert_close(lse[~none], want["lse"][~none], np.float32, f"{tag} lse")
  bs = registry.REGISTRY[impl].small_tiles
  kept = pruning.chunk_tile_ranges(rows.c_hi, rows.c_lo, cols.c_hi, cols.c_lo, rows.seg,
                                   cols.seg, rows.pos, cols.pos, bs.block_q, bs.block_k,
                                   delta).kept_tiles()
  np.testing.assert_array_equal(got["kept"], kept, err_msg=f"{tag} kept tiles")
  return got


# (gate, segments, pruned, pairs). Cases without segments and pruning share one compiled
# program per impl, the others another.
CASES = {
    "medium": ("medium", 0, False, tuple(p for p in PAIRS if p != "own_contiguous")),
    "strong": ("strong", 0, False, ("zigzag_own", "striped_other", "straddling")),
    "spread-segments-acp": ("spread", 5, True, ("own_contiguous", "later_vs_earlier",
                                                "after_all_masked", "zigzag_other",
                                                "straddling")),
}


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_pairs_match_float64(impl):
  for seed, (what, (gate, segments, pruned, pairs)) in enumerate(CASES.items()):
    case = _case(gate, segments, pruned, seed)
    for name in pairs:
      got = _check_pair(impl, case, name, what)
      if name == "after_all_masked":
        assert not np.any(np.asarray(got["kept"])), "a chunk after the queries computes no tile"


def test_pallas_chunk_kernels_are_registered():
  assert {"xla", "pallas_gpu", "pallas_tpu"} <= set(IMPLS)


@pytest.mark.parametrize("impl", [i for i in ("pallas_gpu", "pallas_tpu") if i in IMPLS])
def test_bad_chunks_name_the_argument(impl):
  case = _case("medium", 0, False, seed=0)
  rows, cols = _chunks(case, *PAIRS["zigzag_other"])
  mod = registry.module(impl)
  kw = dict(sm_scale=SCALE, block_sizes=registry.REGISTRY[impl].small_tiles, interpret=True)
  with pytest.raises(ValueError, match=r"rows.pos must have shape \[T\]"):
    mod.forward_chunk(rows._replace(pos=rows.pos[:-1]), cols, None, **kw)
  with pytest.raises(ValueError, match="rows.seg and cols.seg"):
    mod.forward_chunk(rows._replace(seg=jnp.zeros((B, L), jnp.int32)), cols, None, **kw)

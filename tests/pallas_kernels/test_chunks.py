"""The chunk kernels of every blockwise implementation that has them
(``registry.chunk_impls``) on chunk pairs at arbitrary global positions, against the float64
chunk functions of ``reference`` (the same contract, element-wise), which are in turn checked
against the reference op on the whole sequence.

A sequence of N = 512 tokens; each case takes a query chunk and a key chunk of 128 tokens at
the positions a sequence-parallel layout gives a device (contiguous chunks, zigzag's two
runs, striped positions d + P i), including the device's own chunk (its own keys: the
diagonal), a key chunk entirely after the queries (every pair masked: lse = -inf, o = 0,
all gradients 0, no NaN) and one entirely before them (every pair visible), with segment
ids, with an ACP threshold, and under strong forgetting (log f < -8, where dq hinges on the
exact g and the anchored dS). The row terms and the backward get the global lse and g_b of
the whole sequence, rounded to float32 like the kernels' inputs, and the reference uses
those same values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.forgetting_attention import common, pruning, reference, registry
from pallas_kernels.forgetting_attention.common import BlockSizes, Cols, Rows
from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference
from tests.kernel_utils import interpret_for, make_log_fgate, make_segments
from tests.tolerances import assert_close

N, L, P = 512, 128, 4  # sequence, chunk, devices of the layouts
B, HQ, HKV, D = 1, 2, 1, 32
SCALE = D ** -0.5
# The blockwise chunk kernels; reference's are the float64 oracle they are checked against.
IMPLS = tuple(i for i in registry.chunk_impls() if i != "reference")
TILES = BlockSizes(16, 16)  # the oracle's tiles: only its kept-tile count reads them


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


def _f64(tree):
  """Every float array of ``tree`` as a float64 JAX array (call under x64)."""
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64))
                      if np.asarray(a).dtype.kind == "f" else jnp.asarray(a), tree)


@jax.jit
def _reference_chunks(rows, cols, delta, do, lse, dd, g_b):
  """The three chunk functions of ``reference`` (float64 under x64), positions as arguments
  so that pairs of the same shapes share the program."""
  kw = dict(sm_scale=SCALE, block_sizes=TILES)
  o, lse_c, kept = reference.forward_chunk(rows, cols, delta, **kw)
  g, r = reference.row_terms_chunk(rows, cols, do, lse, dd, delta, **kw)
  dq, dk, dv, dc = reference.backward_chunk(rows, cols, do, lse, dd, g_b, delta, **kw)
  return dict(o=o, lse=lse_c, kept=kept, g=g, r=r, dq=dq, dk=dk, dv=dv, dc=dc)


@jax.jit
def _global_terms(rows, cols, delta, do, dd):
  """The whole sequence's lse and g from ``reference``'s chunk functions."""
  kw = dict(sm_scale=SCALE, block_sizes=TILES)
  _, lse, _ = reference.forward_chunk(rows, cols, delta, **kw)
  return lse, reference.row_terms_chunk(rows, cols, do, lse, dd, delta, **kw)[0]


# Jitted: op by op, the scan and the bound took seconds of the suite's time.
_cumsum = jax.jit(functools.partial(common.compensated_cumsum, axis=1))
_threshold = jax.jit(functools.partial(
    pruning.threshold, pruning=pruning.Pruning(log_tolerance=-10.0), sm_scale=SCALE, num_keys=N))


@functools.lru_cache(maxsize=None)
def _case(gate, segments, pruned, seed):
  """The sequence, its c (float32 pair), the global lse and g_b (float32, as a ring passes
  them; from the float64 reference chunk functions over the whole sequence), dd and the ACP
  threshold."""
  x = _sequence(gate, segments, seed)
  c_hi, c_lo = _cumsum(jnp.asarray(x["log_fgate"]))
  delta = np.asarray(_threshold(jnp.asarray(x["q"]), jnp.asarray(x["k"]))) if pruned else None
  dd = np.asarray(common.own_key_dot(jnp.asarray(x["do"]), jnp.asarray(x["v"])))  # [B, Hq, N]
  case = dict(x=x, c_hi=np.asarray(c_hi), c_lo=np.asarray(c_lo), delta=delta, dd=dd)
  everything = np.arange(N)
  rows, cols = _chunks(case, everything, everything)
  with jax.enable_x64(True):
    lse, g = _global_terms(*_f64((rows, cols, delta, x["do"], dd)))
    case.update(lse=np.asarray(lse, np.float32), g_b=np.asarray(g - x["dlse"], np.float32))
  return case


@functools.lru_cache(maxsize=None)
def _expected(case_key, name):
  """The chunk contract in float64 (``reference``'s chunk functions) on the float32 inputs
  the kernels get."""
  case = _case(*case_key)
  qpos, kpos = PAIRS[name]
  rows, cols = _chunks(case, qpos, kpos)
  sl = lambda n: case[n][:, :, qpos]
  with jax.enable_x64(True):
    args = _f64((rows, cols, case["delta"], case["x"]["do"][:, qpos], sl("lse"), sl("dd"),
                 sl("g_b")))
    want = _reference_chunks(*args)
    assert want["o"].dtype == jnp.float64
    return {n: np.asarray(a) for n, a in want.items()}


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


@functools.partial(jax.jit, static_argnums=(3, 4))
def _kept_tiles(rows, cols, delta, block_q, block_k):
  return pruning.chunk_tile_ranges(rows.c_hi, rows.c_lo, cols.c_hi, cols.c_lo, rows.seg,
                                   cols.seg, rows.pos, cols.pos, block_q, block_k,
                                   delta).kept_tiles()


def _check_pair(impl, case_key, name, what):
  case = _case(*case_key)
  qpos, kpos = PAIRS[name]
  rows, cols = _chunks(case, qpos, kpos)
  sl = lambda n: jnp.asarray(case[n][:, :, qpos])
  delta = None if case["delta"] is None else jnp.asarray(case["delta"])
  got = _kernels(impl)(rows, cols, delta, jnp.asarray(case["x"]["do"][:, qpos]), sl("lse"),
                       sl("dd"), sl("g_b"))
  want = _expected(case_key, name)
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
  kept = _kept_tiles(rows, cols, delta, bs.block_q, bs.block_k)
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
    for name in pairs:
      got = _check_pair(impl, (gate, segments, pruned, seed), name, what)
      if name == "after_all_masked":
        assert not np.any(np.asarray(got["kept"])), "a chunk after the queries computes no tile"


def test_pallas_chunk_kernels_are_registered():
  assert {"xla", "pallas_gpu", "pallas_tpu"} <= set(IMPLS)
  assert "reference" in registry.chunk_impls()


@jax.jit
def _whole_sequence(q, k, v, lf, seg, delta, do, dlse):
  """The reference op and its gradients, and the same from ``reference``'s chunk functions on
  ``common.whole_sequence``, composed as the op's backward composes them: dc = the column
  part + the row sums g - g_b r, d log f its reverse cumsum."""
  T, S = q.shape[1], k.shape[1]
  ref = lambda q, k, v, lf: forgetting_attention_reference(
      q, k, v, lf, segment_ids=seg, sm_scale=SCALE, prune_threshold=delta)
  (o_ref, lse_ref), vjp = jax.vjp(ref, q, k, v, lf)
  want = dict(zip(("dq", "dk", "dv", "dlog_fgate"), vjp((do, dlse))), o=o_ref, lse=lse_ref)

  c = jnp.cumsum(lf, axis=1)
  rows, cols = common.whole_sequence(q, k, v, c, jnp.zeros_like(c), seg)
  kw = dict(sm_scale=SCALE, block_sizes=TILES)
  o, lse, kept = reference.forward_chunk(rows, cols, delta, **kw)
  dd = jnp.einsum("bthd,bthd->bht", do, jnp.repeat(v[:, S - T:], HQ // HKV, axis=2))
  g, r = reference.row_terms_chunk(rows, cols, do, lse, dd, delta, **kw)
  g_b = g - dlse
  dq, dk, dv, dc = reference.backward_chunk(rows, cols, do, lse, dd, g_b, delta, **kw)
  dc = dc.at[:, S - T:].add((g - g_b * r).transpose(0, 2, 1))
  got = dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv, dlog_fgate=common.reverse_cumsum(dc))
  # The tiles a blockwise implementation at TILES keeps: the single-device op's count.
  want_kept = pruning.tile_ranges(c, jnp.zeros_like(c), seg, T, TILES.block_q, TILES.block_k,
                                  delta).kept_tiles()
  return got, want, kept, want_kept


def test_reference_chunks_on_the_whole_sequence_are_the_reference_op():
  """The oracle's own check: ``reference``'s chunk functions on the whole sequence (the last
  T = 384 of S = 512 keys, GQA, segments, ACP) equal ``forgetting_attention_reference``:
  output, lse and the gradients of q, k, v and log f, all in float64."""
  T = 384
  x = _sequence("spread", 4, seed=7)
  delta = _threshold(jnp.asarray(x["q"][:, N - T:]), jnp.asarray(x["k"]))
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    got, want, kept, want_kept = _whole_sequence(
        f64(x["q"][:, N - T:]), f64(x["k"]), f64(x["v"]), f64(x["log_fgate"]),
        jnp.asarray(x["seg"]), f64(delta), f64(x["do"][:, N - T:]), f64(x["dlse"][:, :, N - T:]))
    for n, a in got.items():
      assert a.dtype == jnp.float64, n
      assert_close(np.asarray(a), np.asarray(want[n]), np.float64, f"reference chunks {n}")
    kept, want_kept = np.asarray(kept), np.asarray(want_kept)
  np.testing.assert_array_equal(kept, want_kept)
  assert 0 < np.sum(kept) < B * HQ * pruning.causal_tiles(T, N, 16, 16)  # ACP prunes


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

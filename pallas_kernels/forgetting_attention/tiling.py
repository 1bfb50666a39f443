"""What the Pallas kernels (gpu.py, tpu.py) share: operands, tile geometry, positions, the
kept-tile ranges and the passes' set-up around the kernels.

Both backends run the same passes on a chunk pair (``common.Rows`` x ``common.Cols``: queries
and keys anywhere in the sequence, masked by their global positions and biased by the global
c), so the single-device op (``common.whole_sequence``) and one step of a sequence-parallel
ring are one code path:

  forward     grid over q blocks: online softmax over the kept kv tiles of each.
  row sweep   grid over q blocks: the backward's per-row work, in one of three modes:
                "estimate"   dq from the estimate g~ (anchored at the own key), and the row
                             terms (the single-device backward, which needs no third pass);
                "row_terms"  the row terms g, r of the anchored dS alone (ring 1);
                "exact"      dq from the exact g_b (ring 2).
  column sweep grid over kv blocks: dk, dv and the column part of dc, from g_b.

Each backend pads T, S and D to its own legal tile shapes and lays the arrays out its own
way; the operands (:class:`Operands`, one order for both), the sizes, the positions and the
tile ranges at those sizes are the same for both and live here. The anchored dS lives in
``common`` (every implementation uses it).

Padding: padded queries get position -1 and padded keys the largest int32, so no padded
query sees a key, no padded key is seen, and neither is anyone's own key (a real position
is >= 0 and below the largest int32). Tiles whose last key lies strictly before their first
query (:func:`full_blocks`) skip the causal mask and hold no own key; a padded kv block never
qualifies (its last position is the largest int32). Padded query rows can sit in such a
tile; they get do = 0, dd = 0, g = 0, lse = 0 and an edge-replicated c, so their logits are
finite and everything they add to dk, dv, dc is exactly 0.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.forgetting_attention import common, pruning
from pallas_kernels.forgetting_attention.common import BlockSizes, Cols, Rows

# The logit of a masked pair. Every kernel shifts its exponent by a row maximum that is 0
# while the row has seen nothing (``safe_max``), so -inf gives exact zeros and a query that
# sees none of a chunk's keys ends with l = 0 (o = 0, lse = -inf).
MASKED = -float("inf")
# Positions of padded queries and keys.
PAD_Q_POS = -1
PAD_K_POS = int(np.iinfo(np.int32).max)
# Modes of the row sweep (module docstring).
ESTIMATE, ROW_TERMS, EXACT = "estimate", "row_terms", "exact"


def idiv(x: jax.Array, n: int) -> jax.Array:
  """x // n for a non-negative int32 index inside a kernel or an index map, with n a Python
  int: ``lax.div`` with n made int32, so it also traces with jax_enable_x64 on (where a bare
  Python int would become int64)."""
  return lax.div(x, np.int32(n))


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def pad_axis(x: jax.Array, axis: int, size: int, mode: str = "constant", value=0) -> jax.Array:
  """Pads ``x`` along ``axis`` to ``size`` (``value``, or the edge value); no-op when it fits."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  if mode == "edge":
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths, constant_values=value)


def dot(a, b, ta=False, tb=False):
  """a @ b (a^T with ``ta``, b^T with ``tb``) inside a kernel, accumulating in float32; full
  float32 products (no tf32 / bf16 passes) for float32 inputs."""
  ca = 0 if ta else 1
  cb = 1 if tb else 0
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32)


def safe_max(m: jax.Array) -> jax.Array:
  """A row maximum to shift exponents by: 0 where the row has seen no key yet (m = -inf), so
  exp(s - m) of masked logits is exactly 0 instead of NaN."""
  return jnp.where(m == -jnp.inf, 0.0, m)


class Operands(NamedTuple):
  """The arrays every kernel reads, by name and in one order for both backends; each backend
  lays them out (padded, transposed) its own way. None where a pass or the input has none.

  q-side (one entry per query): q, cq_hi, cq_lo (c at the queries), q_pos, seg_q, delta (the
  ACP threshold of the row's head, -inf without pruning), do, lse (in the backend's units),
  dd (do_i . v_i at the own key), g (the row term the pass subtracts: g~ in the "estimate"
  mode, g_b = g - dlse elsewhere), dlse and k_own (k at the query's own position; both
  "estimate" only). kv-side (one entry per key): k, v, ck_hi, ck_lo, k_pos, seg_k.
  """

  q: Any
  k: Any
  v: Any
  cq_hi: Any
  cq_lo: Any
  ck_hi: Any
  ck_lo: Any
  q_pos: Any
  k_pos: Any
  seg_q: Any = None
  seg_k: Any = None
  delta: Any = None
  do: Any = None
  lse: Any = None
  dd: Any = None
  g: Any = None
  dlse: Any = None
  k_own: Any = None


def present(specs: Operands, x: Operands) -> Operands:
  """``specs`` (one BlockSpec per operand) with None wherever ``x`` has no array: the
  in_specs of a pallas_call whose operands are ``x`` (the two pytrees must match)."""
  return Operands(*(None if a is None else s for s, a in zip(specs, x)))


class Geometry:
  """Padded sizes of one pass over a chunk pair with q tile ``bq`` and kv tile ``bk``.

  A tile is never larger than the chunk needs (the next power of two) nor smaller than the
  backend allows (``min_bq``, ``min_bk``); ``dp`` is the padded head dim. The T queries are
  padded to ``tp`` = nq bq rows, the S keys to ``sk`` = nk bk.
  """

  def __init__(self, rows: Rows, cols: Cols, bq: int, bk: int, *, min_bq: int, min_bk: int,
               dp: int):
    B, T, Hq, D = rows.q.shape
    S, Hkv = cols.k.shape[1], cols.k.shape[2]
    self.B, self.T, self.S, self.Hq, self.Hkv, self.D = B, T, S, Hq, Hkv, D
    self.group = Hq // Hkv
    self.bq = max(min_bq, min(bq, next_pow2(T)))
    self.bk = max(min_bk, min(bk, next_pow2(S)))
    self.dp = dp
    self.nq = -(-T // self.bq)
    self.nk = -(-S // self.bk)
    self.tp = self.nq * self.bq
    self.sk = self.nk * self.bk

  def q_pos(self, rows: Rows) -> jax.Array:
    """[tp] int32 query positions, -1 on padding."""
    return pad_axis(rows.pos.astype(jnp.int32), 0, self.tp, value=PAD_Q_POS)

  def k_pos(self, cols: Cols) -> jax.Array:
    """[sk] int32 key positions, the largest int32 on padding."""
    return pad_axis(cols.pos.astype(jnp.int32), 0, self.sk, value=PAD_K_POS)


def full_blocks(q_pos: jax.Array, k_pos: jax.Array, geo: Geometry) -> tuple[jax.Array, jax.Array]:
  """Tiles that need neither the causal mask nor the own-key terms: those whose last key is
  strictly before their first query (positions increase within a chunk, so every pair of
  the tile is visible and none is a query's own key; segments and ACP still mask).

  q_pos [tp], k_pos [sk]: the padded positions (``Geometry``). Returns int32 ``kv_full``
  [nq]: kv blocks [0, kv_full[i]) are full for q block i, and ``q_full`` [nk]: q blocks
  [q_full[j], nq) are full for kv block j. A q block's first row is never padding; a padded
  kv block's last position is the largest int32, so it is never full.
  """
  q_first = q_pos[::geo.bq]  # [nq]
  k_last = k_pos[geo.bk - 1::geo.bk]  # [nk]
  before = k_last[None, :] < q_first[:, None]  # [nq, nk]
  kv_full = jnp.sum(before, axis=1, dtype=jnp.int32)
  q_full = geo.nq - jnp.sum(before, axis=0, dtype=jnp.int32)
  return kv_full, q_full.astype(jnp.int32)


def tile_ranges(geo: Geometry, rows: Rows, cols: Cols, delta) -> pruning.TileRanges:
  """The kept-tile ranges at the kernel's tiles (``pruning.chunk_tile_ranges``)."""
  return pruning.chunk_tile_ranges(rows.c_hi, rows.c_lo, cols.c_hi, cols.c_lo, rows.seg,
                                   cols.seg, rows.pos, cols.pos, geo.bq, geo.bk, delta)


def kept_tiles(geo: Geometry, ranges: pruning.TileRanges, rows: Rows, cols: Cols, delta,
               block_sizes: BlockSizes) -> jax.Array:
  """[B, Hq] kept forward tiles counted at the requested ``block_q x block_k``, so that the
  count matches the ``total_tiles`` api reports, also when the kernel rounded its tiles."""
  if (geo.bq, geo.bk) == (block_sizes.block_q, block_sizes.block_k):
    return ranges.kept_tiles()
  return pruning.chunk_tile_ranges(rows.c_hi, rows.c_lo, cols.c_hi, cols.c_lo, rows.seg,
                                   cols.seg, rows.pos, cols.pos, block_sizes.block_q,
                                   block_sizes.block_k, delta).kept_tiles()


# ----------------------------------------------------------------------------- passes
#
# Each backend provides its passes on a chunk pair, with the log-sum-exp in its own units
# (``lse_res``: base 2 for pallas_gpu, natural for pallas_tpu):
#
#   forward(rows, cols, delta, out_dtype) -> o [B, T, Hq, D] out_dtype, lse_res [B, Hq, T]
#       (-inf where a query sees none of the keys, o = 0 there), kept tiles [B, Hq]
#   row_sweep(mode, rows, cols, delta, do, lse_res, dd, g, dlse, k_own)
#       "estimate"  -> dq (q.dtype), gsum, p_off     "row_terms" -> gsum, p_off
#       "exact"     -> dq (float32)
#     with gsum_i = sum_{j != i} P_ij X_ij and p_off_i = sum_{j != i} P_ij, [B, Hq, T]
#   column_sweep(rows, cols, delta, do, lse_res, dd, g_b, out_dtype)
#       -> dk, dv [B, S, Hkv, D] out_dtype, dc_col [B, S, Hq] f32 = -sum_{i != j} dS_ij
#
# and its module's backward functions are the compositions below (the forwards only convert
# the lse).


class Passes(NamedTuple):
  """A backend's backward sweeps (bound to sm_scale, block sizes, interpret) and the
  conversion of a natural lse to its units."""

  row_sweep: Callable
  column_sweep: Callable
  to_res: Callable


def single_device_backward(passes: Passes, q, k, v, c_hi, c_lo, segment_ids, delta, o, lse_res,
                           do, dlse):
  """The single-device backward: the "estimate" row sweep (dq and the exact row terms in one
  pass; see ``common``, "anchored dS") and the column sweep with g_b = g - dlse.

  dc_t = sum_{j != t} dS_tj - sum_{i != t} dS_it leaves out the diagonal that the row and
  column sums share, which would otherwise cancel when P_tt ~ 1; the row part is
  gsum_t - g_b_t p_off_t. Two kernels: the chunk path's three (``row_terms_chunk``, then
  ``backward_chunk``) would sweep every kept tile once more for nothing, since here the
  estimate's error is suppressed by the anchoring.
  """
  T, S = q.shape[1], k.shape[1]
  rows, cols = common.whole_sequence(q, k, v, c_hi, c_lo, segment_ids)
  dlse = dlse.astype(jnp.float32)
  dd = common.own_key_dot(do, v)  # [B, Hq, T]: the anchor of dS
  gt = common.row_term_estimate(o, do, dd, dlse)
  dq, gsum, p_off = passes.row_sweep(ESTIMATE, rows, cols, delta, do, lse_res, dd, gt, dlse,
                                     k[:, S - T:])
  g_b = gsum - dlse
  dk, dv, dc = passes.column_sweep(rows, cols, delta, do, lse_res, dd, g_b, k.dtype)
  row_sums = (gsum - g_b * p_off).transpose(0, 2, 1)  # [B, T, Hq]: sum_{j != i} dS_ij
  return dq, dk, dv, dc.at[:, S - T:].add(row_sums)


def backward_chunk_kernels(passes_of):
  """A Pallas module's ``row_terms_chunk`` and ``backward_chunk`` (the contract of
  ``xla.row_terms_chunk`` / ``xla.backward_chunk``) from its ``passes_of(sm_scale,
  block_sizes, interpret) -> Passes``; both take the natural global lse and convert it to
  the backend's units once."""

  def row_terms_chunk(rows: Rows, cols: Cols, do, lse, dd, delta, *, sm_scale: float,
                      block_sizes: BlockSizes, interpret: bool = False):
    """g_i = sum_{j != i} P_ij (dP_ij - dd_i) and r_i = sum_{j != i} P_ij over the keys of
    ``cols``, each [B, Hq, T] float32, P from the global natural ``lse``."""
    check_chunks(rows, cols, "row_terms_chunk")
    passes = passes_of(sm_scale, block_sizes, interpret)
    return passes.row_sweep(ROW_TERMS, rows, cols, delta, do, passes.to_res(lse), dd, None,
                            None, None)

  def backward_chunk(rows: Rows, cols: Cols, do, lse, dd, g_b, delta, *, sm_scale: float,
                     block_sizes: BlockSizes, interpret: bool = False):
    """dq [B, T, Hq, D], dk, dv [B, S, Hkv, D] and dc_col [B, S, Hq] = -sum_{i != j} dS_ij,
    all float32, with dS_ij = P_ij ((dP_ij - dd_i) - g_b_i): the exact row sweep, then the
    column sweep."""
    check_chunks(rows, cols, "backward_chunk")
    passes = passes_of(sm_scale, block_sizes, interpret)
    lse_res = passes.to_res(lse)
    g_b = g_b.astype(jnp.float32)
    dq = passes.row_sweep(EXACT, rows, cols, delta, do, lse_res, dd, g_b, None, None)
    dk, dv, dc = passes.column_sweep(rows, cols, delta, do, lse_res, dd, g_b, jnp.float32)
    return dq, dk, dv, dc

  return row_terms_chunk, backward_chunk


def check_chunks(rows: Rows, cols: Cols, what: str):
  """A ValueError naming the argument for chunk pairs the kernels cannot take."""
  if not isinstance(rows, Rows):
    raise ValueError(f"{what}: rows must be a common.Rows, got {type(rows).__name__}")
  if not isinstance(cols, Cols):
    raise ValueError(f"{what}: cols must be a common.Cols, got {type(cols).__name__}")
  T, S = rows.q.shape[1], cols.k.shape[1]
  if rows.pos.shape != (T,):
    raise ValueError(f"{what}: rows.pos must have shape [T] = {(T,)}, got {rows.pos.shape}")
  if cols.pos.shape != (S,):
    raise ValueError(f"{what}: cols.pos must have shape [S] = {(S,)}, got {cols.pos.shape}")
  if (rows.seg is None) != (cols.seg is None):
    raise ValueError(f"{what}: rows.seg and cols.seg must both be given or both be None")

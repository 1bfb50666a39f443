"""Forgetting attention as Pallas kernels lowered to Triton (GPU; interpret mode on a CPU).

Three kernels, none with atomics, each on a chunk pair (``common.Rows`` x ``common.Cols``:
global positions and the global c on each side), so the single-device op (the chunk pair
``common.whole_sequence``) and the sequence-parallel ring run the same kernels (``tiling``
has the passes and how they compose):

  forward       grid (q blocks, B, Hq):  online softmax over the kept kv tiles of one q block.
  row sweep     grid (q blocks, B, Hq):  loops over the kept kv tiles of one q block for the
                backward's per-row work: dq (from the estimate g~ or the exact g_b) and the
                row terms of the anchored dS (see the comment above the backward kernels).
  column sweep  grid (kv blocks, B, Hkv): one kv tile stays on chip while the kernel loops
                over the q heads of its GQA group and, for each, over that head's kept q
                tiles; dk, dv and dc = -(column sums of dS) per q head. Reads g_b.

Every loop runs over a dynamic tile range from ``pruning.chunk_tile_ranges`` (causal order of
the positions, segment boundaries, ACP), so skipped tiles are never loaded. Inside a range,
tiles whose last key lies strictly before their first query (``tiling.full_blocks``) skip
the causal mask and hold no query's own key; the others mask by position (pos_q >= pos_k)
and segment, and find the own key where pos_q == pos_k. With segment ids every tile masks.
The forward uses ``block_q x block_k`` tiles, the backward sweeps ``block_q_bwd x block_k_bwd``.

Logits are kept in base 2: s2 = log2(e) * (scale * q.k + D) with
D_ij = (c_hi_i - c_hi_j) + (c_lo_i - c_lo_j) (see ``common``), so one exp2 per element. The
single-device backward reads the forward's base-2 log-sum-exp lse2 = m + log2(l) as the
forward computed it, and recomputes P = exp2(s2 - lse2) from the same s2: converting lse2 to
natural log and back would round it twice, and P inherits that absolute error of
~|lse2| 2^-23, a relative error of 1e-4 at logits ~1e3 (inf at ~1e9). The natural lse is
for the stats and the chunk contract: the ring merges natural-log lse over chunks, so its
backward kernels get the global lse in natural log and convert it once (``_LOG2E``).
Float32 inputs use full float32 products (no tf32); bf16 / f16 feed the tensor cores with
float32 accumulation.

Padding happens here, not in the kernels: T and S are padded to whole tiles and D to a
power of two (at least 16, the smallest Triton dot); positions, c and the other padded rows
follow ``tiling``. Works with JAX 0.10 and 0.11 (``_launch`` picks the Triton
compiler-params class).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.forgetting_attention import common, tiling
from pallas_kernels.forgetting_attention.common import BlockSizes, Cols, Rows
from pallas_kernels.forgetting_attention.tiling import EXACT, ESTIMATE, ROW_TERMS, Operands

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MIN_BLOCK = 16


def default_block_sizes(head_dim: int) -> BlockSizes:
  """Tiles tuned on an H100 (bf16, T = 16k) per head dim; see benchmarks/NOTES.md.

  With num_warps / num_stages left to ``_warps`` / ``_stages`` this gives 4 warps and 3
  stages for D <= 64 and 8 warps and 2 stages for D = 128 (80 and 96 are padded to 128).
  Head dims above 128 get smaller tiles to stay inside shared memory and registers.
  """
  if head_dim <= 64:
    return BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)
  if head_dim <= 128:
    return BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=64)
  return BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=32)


def _launch(num_warps: int, num_stages: int):
  """Triton launch parameters under the class name this JAX version uses."""
  cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _warps(bs: BlockSizes, bq: int, bk: int, dp: int) -> int:
  if bs.num_warps is not None:
    return bs.num_warps
  # Wide heads spread their [tile, D] float32 accumulators over more registers.
  return 8 if bq * bk >= 128 * 128 or dp >= 256 or (dp >= 128 and bq * bk >= 128 * 64) else 4


def _stages(bs: BlockSizes, dp: int) -> int:
  if bs.num_stages is not None:
    return bs.num_stages
  return 3 if dp <= 64 else 2


def _logits(q, k, cq_hi, cq_lo, ck_hi, ck_lo, qk_scale, delta):
  """Base-2 logits of one tile, [bq, bk] float32; pairs pruned by ACP already masked.

  ``delta`` [bq] (the ACP threshold of each row's head; -inf without pruning) drops every
  pair with D_ij < delta element-wise, inside kept tiles too, so the function computed does
  not depend on the tiling (the forward and backward tiles differ) and equals the
  reference's. The compare runs with and without pruning: one code path, so pruning that
  finds nothing to prune changes no bit of any result. It asks "below delta" so that a NaN
  decay (a NaN gate) is kept and reaches the output instead of being masked away.
  """
  decay = (cq_hi[:, None] - ck_hi[None, :]) + (cq_lo[:, None] - ck_lo[None, :])
  s = tiling.dot(q, k, tb=True) * qk_scale + decay * _LOG2E
  return jnp.where(decay < delta[:, None], tiling.MASKED, s)


def _mask(s, q_pos, k_pos, seg_q, seg_k):
  """The causal mask by global position (a key at or before the query) and the segment mask;
  also the own-key diagonal (equal positions), [bq, bk]."""
  keep = k_pos[None, :] <= q_pos[:, None]
  if seg_q is not None:
    keep = keep & (seg_q[:, None] == seg_k[None, :])
  return jnp.where(keep, s, tiling.MASKED), q_pos[:, None] == k_pos[None, :]


def _split(start, end, boundary):
  """The boundary clipped into [start, end): the loop splits there into two parts."""
  return jnp.minimum(jnp.maximum(boundary, start), end)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(kvs_ref, kve_ref, full_ref, x: Operands, o_ref, lse_ref, *, scale, bk,
                has_seg):
  i = pl.program_id(0)
  start, end = kvs_ref[i], kve_ref[i]
  q = x.q[...]  # [bq, Dp]
  cq_hi, cq_lo = x.cq_hi[...], x.cq_lo[...]  # [bq]
  q_pos = x.q_pos[...]
  seg_q = x.seg_q[...] if has_seg else None
  delta = x.delta[...]
  qk_scale = scale * _LOG2E

  def body(kb, carry, masked):
    acc, m, l = carry
    ks = pl.ds(kb * bk, bk)
    k = x.k[ks, :]  # [bk, Dp]
    v = x.v[ks, :]
    s = _logits(q, k, cq_hi, cq_lo, x.ck_hi[ks], x.ck_lo[ks], qk_scale, delta)  # [bq, bk]
    if masked:
      s, _ = _mask(s, q_pos, x.k_pos[ks], seg_q, x.seg_k[ks] if has_seg else None)
    # Triton lowers max to maxnumf, which skips NaN; a NaN logit still reaches l and acc
    # through its own p = exp2(NaN - m), so NaN input gives a NaN row, not a dropped pair.
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    shift = tiling.safe_max(m_new)
    alpha = jnp.exp2(m - shift)
    p = jnp.exp2(s - shift[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + tiling.dot(p.astype(v.dtype), v)
    return acc, m_new, l

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((q.shape[0],), -jnp.inf, jnp.float32),
           jnp.zeros((q.shape[0],), jnp.float32))
  # kv blocks [start, mid) lie strictly before the block's first query: no mask needed.
  mid = start if has_seg else _split(start, end, full_ref[i])
  carry = lax.fori_loop(start, mid, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(mid, end, functools.partial(body, masked=True), carry)
  # A row that saw no key has l = 0, acc = 0, m = -inf: o = 0 and lse2 = -inf.
  l = jnp.where(l == 0.0, 1.0, l)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)  # base 2: the backward's P must see these very bits


# ----------------------------------------------------------------------------- backward
#
# Both sweeps use the anchored dS of ``common`` ("anchored dS"): X_ij = dP_ij - dd_i is
# exactly 0 on the diagonal and dS_ij = P_ij (X_ij - g_i). The row sweep has three modes
# (``tiling``):
#
#   "estimate"  (single device) sums g_i exactly over its row (for the column sweep, which
#               runs after it) but must form dS before the sweep ends, so it uses the
#               estimate g~ and anchors k at the own key,
#
#                 dq_i = scale * (sum_{j != i} dS~_ij k_j - (sum_{j != i} dS~_ij - dlse_i) k_i),
#
#               off by (g_i - g~_i) sum_{j != i} P_ij (k_j - k_i), which vanishes with
#               1 - P_ii. The row sum of dS~ is taken over the values the matmul sees
#               (rounded to the input dtype), so the two terms cancel exactly where the keys
#               are alike. Three tile matmuls (QK^T, dO V^T, dS~ K).
#   "row_terms" (ring 1) the sums alone: g_i = sum_{j != i} P_ij X_ij, r_i = sum_{j != i} P_ij
#               over the chunk's keys; two matmuls (QK^T, dO V^T).
#   "exact"     (ring 2) dq_i = scale sum_j dS_ij k_j with the exact global g_b: each dS_ij
#               keeps its relative precision, the own key's too (dS_ii = -P_ii g_b_i); three
#               matmuls.
#
# The column sweep has four (QK^T, dO V^T, P^T dO, dS^T Q).


def _row_kernel(kvs_ref, kve_ref, full_ref, x: Operands, *outs, scale, bk, has_seg, mode):
  i = pl.program_id(0)
  start, end = kvs_ref[i], kve_ref[i]
  q = x.q[...]  # [bq, Dp]
  do = x.do[...]
  lse2 = x.lse[...]  # [bq], base 2
  dd = x.dd[...]
  g = None if mode == ROW_TERMS else x.g[...]  # g~ ("estimate") or g_b ("exact")
  cq_hi, cq_lo = x.cq_hi[...], x.cq_lo[...]
  q_pos = x.q_pos[...]
  seg_q = x.seg_q[...] if has_seg else None
  delta = x.delta[...]
  qk_scale = scale * _LOG2E
  sums = mode in (ESTIMATE, ROW_TERMS)

  def body(kb, carry, masked):
    ks = pl.ds(kb * bk, bk)
    k = x.k[ks, :]
    s = _logits(q, k, cq_hi, cq_lo, x.ck_hi[ks], x.ck_lo[ks], qk_scale, delta)
    xx = tiling.dot(do, x.v[ks, :], tb=True) - dd[:, None]  # X, [bq, bk]
    if masked:
      s, diag = _mask(s, q_pos, x.k_pos[ks], seg_q, x.seg_k[ks] if has_seg else None)
      xx = jnp.where(diag, 0.0, xx)
    p = jnp.exp2(s - lse2[:, None])  # [bq, bk]
    out = dict(carry)
    if sums:
      px = p * xx
      out["gsum"] = carry["gsum"] + jnp.sum(px, axis=1)
      out["p_off"] = carry["p_off"] + jnp.sum(jnp.where(diag, 0.0, p) if masked else p, axis=1)
    if mode == ESTIMATE:
      ds = px - p * g[:, None]
      if masked:  # the own key's term is the k_i part of the anchoring
        ds = jnp.where(diag, 0.0, ds)
      ds = ds.astype(k.dtype)
      out["dsk"] = carry["dsk"] + tiling.dot(ds, k)
      out["ds_row"] = carry["ds_row"] + jnp.sum(ds.astype(jnp.float32), axis=1)
    elif mode == EXACT:
      ds = (p * (xx - g[:, None])).astype(k.dtype)
      out["dsk"] = carry["dsk"] + tiling.dot(ds, k)
    return out

  zrow = jnp.zeros((q.shape[0],), jnp.float32)
  carry = {}
  if sums:
    carry.update(gsum=zrow, p_off=zrow)
  if mode != ROW_TERMS:
    carry["dsk"] = jnp.zeros(q.shape, jnp.float32)
  if mode == ESTIMATE:
    carry["ds_row"] = zrow
  mid = start if has_seg else _split(start, end, full_ref[i])
  carry = lax.fori_loop(start, mid, functools.partial(body, masked=False), carry)
  carry = lax.fori_loop(mid, end, functools.partial(body, masked=True), carry)
  if mode == ESTIMATE:
    dq_ref, gsum_ref, poff_ref = outs
    dlse = x.dlse[...]
    k_own = x.k_own[...].astype(jnp.float32)  # [bq, Dp]: k at each query's own position
    dq = scale * (carry["dsk"] - (carry["ds_row"] - dlse)[:, None] * k_own)
    dq_ref[...] = dq.astype(dq_ref.dtype)
  elif mode == ROW_TERMS:
    gsum_ref, poff_ref = outs
  else:
    (dq_ref,) = outs
    dq_ref[...] = (scale * carry["dsk"]).astype(dq_ref.dtype)
  if sums:
    gsum_ref[...] = carry["gsum"]
    poff_ref[...] = carry["p_off"]


def _column_kernel(qs_ref, qe_ref, full_ref, x: Operands, dk_ref, dv_ref, dc_ref, *, scale,
                   bq, group, has_seg):
  j = pl.program_id(0)
  hkv = pl.program_id(2)
  k = x.k[...]  # [bk, Dp]
  v = x.v[...]
  k_pos = x.k_pos[...]  # [bk]
  seg_k = x.seg_k[...] if has_seg else None
  qk_scale = scale * _LOG2E
  first_full = full_ref[j]  # q blocks from here on lie strictly after the tile's last key

  def head(gi, carry):
    dk, dv = carry
    h = hkv * group + gi
    ck_hi, ck_lo = x.ck_hi[h, :], x.ck_lo[h, :]  # [bk]
    start, end = qs_ref[h, j], qe_ref[h, j]

    def body(a, inner, masked):
      dk, dv, dcol = inner
      qsl = pl.ds(a * bq, bq)
      q = x.q[qsl, h, :]  # [bq, Dp]
      do = x.do[qsl, h, :]
      lse2 = x.lse[h, qsl]  # [bq], base 2
      dd = x.dd[h, qsl]
      g_b = x.g[h, qsl]
      s = _logits(q, k, x.cq_hi[h, qsl], x.cq_lo[h, qsl], ck_hi, ck_lo, qk_scale,
                  x.delta[h, qsl])
      xx = tiling.dot(do, v, tb=True) - dd[:, None]  # [bq, bk]
      if masked:
        s, diag = _mask(s, x.q_pos[qsl], k_pos, x.seg_q[qsl] if has_seg else None, seg_k)
        xx = jnp.where(diag, 0.0, xx)
      p = jnp.exp2(s - lse2[:, None])
      ds = p * (xx - g_b[:, None])
      dv = dv + tiling.dot(p.astype(do.dtype), do, ta=True)
      dk = dk + tiling.dot(ds.astype(q.dtype), q, ta=True)
      # Column sum of dS without its diagonal (the row terms leave it out too).
      col = jnp.sum(jnp.where(diag, 0.0, ds) if masked else ds, axis=0)
      return dk, dv, dcol - col

    inner = (dk, dv, jnp.zeros((k.shape[0],), jnp.float32))
    mid = end if has_seg else _split(start, end, first_full)
    inner = lax.fori_loop(start, mid, functools.partial(body, masked=True), inner)
    dk, dv, dcol = lax.fori_loop(mid, end, functools.partial(body, masked=False), inner)
    dc_ref[h, :] = dcol
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- layout


class _Layout(tiling.Geometry):
  """The sizes of one pass and the arrays in the kernels' layout: q-side [B, tp, Hq, Dp] and
  kv-side [B, sk, Hkv, Dp] tiles, per-query vectors [B, Hq, tp], per-key [B, Hq, sk]."""

  def __init__(self, rows: Rows, cols: Cols, bq: int, bk: int):
    super().__init__(rows, cols, bq, bk, min_bq=_MIN_BLOCK, min_bk=_MIN_BLOCK,
                     dp=max(_MIN_BLOCK, tiling.next_pow2(rows.q.shape[-1])))

  def q_side(self, x):  # [B, T, H, D] -> [B, tp, H, dp]
    return tiling.pad_axis(tiling.pad_axis(x, 1, self.tp), 3, self.dp)

  def kv_side(self, x):  # [B, S, Hkv, D] -> [B, sk, Hkv, dp]
    return tiling.pad_axis(tiling.pad_axis(x, 1, self.sk), 3, self.dp)

  def per_query(self, x):  # [B, Hq, T] -> [B, Hq, tp] f32, zero-padded
    return tiling.pad_axis(x.astype(jnp.float32), 2, self.tp)

  def operands(self, rows: Rows, cols: Cols, delta) -> Operands:
    """The forward's operands; c and segment ids edge-replicated into the padding."""
    has_seg = rows.seg is not None
    c_q = lambda c: tiling.pad_axis(c.transpose(0, 2, 1), 2, self.tp, mode="edge")
    c_k = lambda c: tiling.pad_axis(c.transpose(0, 2, 1), 2, self.sk, mode="edge")
    if delta is None:
      delta_q = jnp.full((self.B, self.Hq, self.tp), -jnp.inf, jnp.float32)
    else:
      delta_q = jnp.broadcast_to(delta.astype(jnp.float32)[:, :, None],
                                 (self.B, self.Hq, self.tp))
    return Operands(
        q=self.q_side(rows.q), k=self.kv_side(cols.k), v=self.kv_side(cols.v),
        cq_hi=c_q(rows.c_hi), cq_lo=c_q(rows.c_lo), ck_hi=c_k(cols.c_hi), ck_lo=c_k(cols.c_lo),
        q_pos=self.q_pos(rows), k_pos=self.k_pos(cols),
        seg_q=tiling.pad_axis(rows.seg, 1, self.tp, mode="edge") if has_seg else None,
        seg_k=tiling.pad_axis(cols.seg, 1, self.sk, mode="edge") if has_seg else None,
        delta=delta_q)

  def row_specs(self) -> Operands:
    """BlockSpecs of the grid (q blocks, B, Hq): one q block of one head, every key."""
    group = self.group
    q_tile = pl.BlockSpec((None, self.bq, None, self.dp), lambda i, b, h: (b, i, h, 0))
    kv_all = pl.BlockSpec((None, self.sk, None, self.dp), lambda i, b, h: (b, 0, h // group, 0))
    q_vec = pl.BlockSpec((None, None, self.bq), lambda i, b, h: (b, h, i))
    k_vec = pl.BlockSpec((None, None, self.sk), lambda i, b, h: (b, h, 0))
    return Operands(
        q=q_tile, k=kv_all, v=kv_all, cq_hi=q_vec, cq_lo=q_vec, ck_hi=k_vec, ck_lo=k_vec,
        q_pos=pl.BlockSpec((self.bq,), lambda i, b, h: (i,)),
        k_pos=pl.BlockSpec((self.sk,), lambda i, b, h: (0,)),
        seg_q=pl.BlockSpec((None, self.bq), lambda i, b, h: (b, i)),
        seg_k=pl.BlockSpec((None, self.sk), lambda i, b, h: (b, 0)),
        delta=q_vec, do=q_tile, lse=q_vec, dd=q_vec, g=q_vec, dlse=q_vec,
        k_own=pl.BlockSpec((None, self.bq, None, self.dp),
                           lambda i, b, h: (b, i, h // group, 0)))

  def column_specs(self) -> Operands:
    """BlockSpecs of the grid (kv blocks, B, Hkv): one kv block of one kv head, every query
    of every head."""
    q_all = pl.BlockSpec((None, self.tp, self.Hq, self.dp), lambda j, b, h: (b, 0, 0, 0))
    kv_tile = pl.BlockSpec((None, self.bk, None, self.dp), lambda j, b, h: (b, j, h, 0))
    q_vec = pl.BlockSpec((None, self.Hq, self.tp), lambda j, b, h: (b, 0, 0))
    k_vec = pl.BlockSpec((None, self.Hq, self.bk), lambda j, b, h: (b, 0, j))
    return Operands(
        q=q_all, k=kv_tile, v=kv_tile, cq_hi=q_vec, cq_lo=q_vec, ck_hi=k_vec, ck_lo=k_vec,
        q_pos=pl.BlockSpec((self.tp,), lambda j, b, h: (0,)),
        k_pos=pl.BlockSpec((self.bk,), lambda j, b, h: (j,)),
        seg_q=pl.BlockSpec((None, self.tp), lambda j, b, h: (b, 0)),
        seg_k=pl.BlockSpec((None, self.bk), lambda j, b, h: (b, j)),
        delta=q_vec, do=q_all, lse=q_vec, dd=q_vec, g=q_vec)


def _params(block_sizes: BlockSizes, geo: _Layout):
  return _launch(_warps(block_sizes, geo.bq, geo.bk, geo.dp), _stages(block_sizes, geo.dp))


def _backward_operands(geo: _Layout, rows, cols, delta, do, lse2, dd, g):
  return geo.operands(rows, cols, delta)._replace(
      do=geo.q_side(do), lse=geo.per_query(lse2), dd=geo.per_query(dd),
      g=None if g is None else geo.per_query(g))


# ----------------------------------------------------------------------------- passes


def _forward(rows: Rows, cols: Cols, delta, out_dtype, *, sm_scale, block_sizes, interpret):
  """o [B, T, Hq, D] out_dtype, lse2 [B, Hq, T] (base 2) and kept tiles [B, Hq]."""
  geo = _Layout(rows, cols, block_sizes.block_q, block_sizes.block_k)
  ranges = tiling.tile_ranges(geo, rows, cols, delta)
  kept = tiling.kept_tiles(geo, ranges, rows, cols, delta, block_sizes)
  x = geo.operands(rows, cols, delta)
  kv_full, _ = tiling.full_blocks(x.q_pos, x.k_pos, geo)
  specs = geo.row_specs()
  r_spec = pl.BlockSpec((None, None, geo.nq), lambda i, b, h: (b, h, 0))
  full_spec = pl.BlockSpec((geo.nq,), lambda i, b, h: (0,))
  kernel = functools.partial(_fwd_kernel, scale=sm_scale, bk=geo.bk, has_seg=rows.seg is not None)
  o, lse2 = pl.pallas_call(
      kernel,
      grid=(geo.nq, geo.B, geo.Hq),
      in_specs=[r_spec, r_spec, full_spec, tiling.present(specs, x)],
      out_specs=[specs.q, specs.lse],
      out_shape=[jax.ShapeDtypeStruct((geo.B, geo.tp, geo.Hq, geo.dp), out_dtype),
                 jax.ShapeDtypeStruct((geo.B, geo.Hq, geo.tp), jnp.float32)],
      compiler_params=_params(block_sizes, geo),
      interpret=interpret,
      name="forgetting_attention_fwd",
  )(ranges.kv_start, ranges.kv_end, kv_full, x)
  return o[:, :geo.T, :, :geo.D], lse2[:, :, :geo.T], kept


def _row_sweep(mode, rows: Rows, cols: Cols, delta, do, lse2, dd, g, dlse, k_own, *, sm_scale,
               block_sizes, interpret):
  """The row sweep in ``mode`` (see ``tiling``): "estimate" -> dq (q.dtype), gsum, p_off;
  "row_terms" -> gsum, p_off; "exact" -> dq (float32); sums [B, Hq, T]."""
  geo = _Layout(rows, cols, *block_sizes.bwd)
  ranges = tiling.tile_ranges(geo, rows, cols, delta)
  x = _backward_operands(geo, rows, cols, delta, do, lse2, dd, g)
  if mode == ESTIMATE:
    x = x._replace(dlse=geo.per_query(dlse), k_own=geo.q_side(k_own))
  kv_full, _ = tiling.full_blocks(x.q_pos, x.k_pos, geo)
  specs = geo.row_specs()
  r_spec = pl.BlockSpec((None, None, geo.nq), lambda i, b, h: (b, h, 0))
  full_spec = pl.BlockSpec((geo.nq,), lambda i, b, h: (0,))
  sd = jax.ShapeDtypeStruct
  dq_shape = sd((geo.B, geo.tp, geo.Hq, geo.dp),
                rows.q.dtype if mode == ESTIMATE else jnp.float32)
  sum_shape = sd((geo.B, geo.Hq, geo.tp), jnp.float32)
  shapes = {ESTIMATE: [dq_shape, sum_shape, sum_shape], ROW_TERMS: [sum_shape, sum_shape],
            EXACT: [dq_shape]}[mode]
  out_specs = [specs.q if s is dq_shape else specs.lse for s in shapes]
  outs = pl.pallas_call(
      functools.partial(_row_kernel, scale=sm_scale, bk=geo.bk, has_seg=rows.seg is not None,
                        mode=mode),
      grid=(geo.nq, geo.B, geo.Hq),
      in_specs=[r_spec, r_spec, full_spec, tiling.present(specs, x)],
      out_specs=out_specs,
      out_shape=shapes,
      compiler_params=_params(block_sizes, geo),
      interpret=interpret,
      name={ESTIMATE: "forgetting_attention_dq", ROW_TERMS: "forgetting_attention_row_terms",
            EXACT: "forgetting_attention_dq_exact"}[mode],
  )(ranges.kv_start, ranges.kv_end, kv_full, x)
  unpad = lambda a: a[:, :geo.T, :, :geo.D] if a.ndim == 4 else a[:, :, :geo.T]
  outs = [unpad(a) for a in outs]
  return outs[0] if mode == EXACT else tuple(outs)


def _column_sweep(rows: Rows, cols: Cols, delta, do, lse2, dd, g_b, out_dtype, *, sm_scale,
                  block_sizes, interpret):
  """dk, dv [B, S, Hkv, D] out_dtype and dc_col [B, S, Hq] f32."""
  geo = _Layout(rows, cols, *block_sizes.bwd)
  ranges = tiling.tile_ranges(geo, rows, cols, delta)
  x = _backward_operands(geo, rows, cols, delta, do, lse2, dd, g_b)
  _, q_full = tiling.full_blocks(x.q_pos, x.k_pos, geo)
  specs = geo.column_specs()
  r_spec = pl.BlockSpec((None, geo.Hq, geo.nk), lambda j, b, h: (b, 0, 0))
  full_spec = pl.BlockSpec((geo.nk,), lambda j, b, h: (0,))
  kv_shape = jax.ShapeDtypeStruct((geo.B, geo.sk, geo.Hkv, geo.dp), out_dtype)
  dk, dv, dc = pl.pallas_call(
      functools.partial(_column_kernel, scale=sm_scale, bq=geo.bq, group=geo.group,
                        has_seg=rows.seg is not None),
      grid=(geo.nk, geo.B, geo.Hkv),
      in_specs=[r_spec, r_spec, full_spec, tiling.present(specs, x)],
      out_specs=[specs.k, specs.k, specs.ck_hi],
      out_shape=[kv_shape, kv_shape, jax.ShapeDtypeStruct((geo.B, geo.Hq, geo.sk), jnp.float32)],
      compiler_params=_params(block_sizes, geo),
      interpret=interpret,
      name="forgetting_attention_dkv",
  )(ranges.q_start, ranges.q_end, q_full, x)
  unpad = lambda a: a[:, :geo.S, :, :geo.D]
  return unpad(dk), unpad(dv), dc[:, :, :geo.S].transpose(0, 2, 1)


def _passes(sm_scale: float, block_sizes: BlockSizes, interpret: bool) -> tiling.Passes:
  kw = dict(sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)
  # The one rounding of the chunk path: the ring's merged lse is natural.
  return tiling.Passes(functools.partial(_row_sweep, **kw), functools.partial(_column_sweep, **kw),
                       to_res=lambda lse: lse.astype(jnp.float32) * _LOG2E)


# ----------------------------------------------------------------------------- the module's api


def forward(q, k, v, c_hi, c_lo, segment_ids, delta, *, sm_scale: float,
            block_sizes: BlockSizes, interpret: bool = False):
  """o [B, T, Hq, D] (q.dtype), lse [B, Hq, T] f32, kept_tiles [B, Hq] i32 and lse2 [B, Hq, T]
  f32, the base-2 log-sum-exp that ``backward`` reads (see ``api``): the chunk pair
  ``common.whole_sequence``."""
  rows, cols = common.whole_sequence(q, k, v, c_hi, c_lo, segment_ids)
  o, lse2, kept = _forward(rows, cols, delta, q.dtype, sm_scale=sm_scale,
                           block_sizes=block_sizes, interpret=interpret)
  return o, lse2 * _LN2, kept, lse2


def backward(q, k, v, c_hi, c_lo, segment_ids, delta, o, lse2, do, dlse, *, sm_scale: float,
             block_sizes: BlockSizes, interpret: bool = False):
  """dq, dk, dv in the inputs' dtypes and dc [B, S, Hq] f32 (see ``api``); lse2 is the
  forward's base-2 log-sum-exp, read as computed (``tiling.single_device_backward``)."""
  return tiling.single_device_backward(_passes(sm_scale, block_sizes, interpret), q, k, v, c_hi,
                                       c_lo, segment_ids, delta, o, lse2, do, dlse)


def forward_chunk(rows: Rows, cols: Cols, delta, *, sm_scale: float, block_sizes: BlockSizes,
                  interpret: bool = False):
  """The queries of ``rows`` against the keys of ``cols`` alone, at any global positions:
  o [B, T, Hq, D] float32 normalised over these keys, their natural lse [B, Hq, T] (-inf
  where a query sees none of them, o = 0 there) and the kept tiles [B, Hq] int32; the
  contract of ``xla.forward_chunk``."""
  tiling.check_chunks(rows, cols, "forward_chunk")
  o, lse2, kept = _forward(rows, cols, delta, jnp.float32, sm_scale=sm_scale,
                           block_sizes=block_sizes, interpret=interpret)
  return o, lse2 * _LN2, kept


row_terms_chunk, backward_chunk = tiling.backward_chunk_kernels(_passes)

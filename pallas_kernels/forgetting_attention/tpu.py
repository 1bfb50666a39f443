"""Forgetting attention as Pallas Mosaic kernels (TPU; TPU interpret mode on a CPU).

The algorithm is ``gpu.py``'s (online softmax forward, anchored dS backward with a dQ pass
that also writes the row term g, and a dK/dV pass that also writes dc), laid out the TPU
way: every tile loop is a grid axis, and data-dependent tile skipping comes from scalar
prefetch.

  forward  grid (B, Hq, q blocks, kv steps):          acc, m, l in VMEM scratch
  dQ       grid (B, Hq, q blocks, kv steps):          dS~ K, row sums of dS~, P X and
                                                      off-diagonal P
  dK/dV    grid (B, Hkv, kv blocks, group, q steps):  dk, dv across the GQA group's q heads;
                                                      dc per q head

The innermost axes are "arbitrary" (sequential, accumulating in scratch); the others are
"parallel". ``pruning.tile_ranges`` (causal diagonal, segments, ACP) gives each q block its
kept kv blocks [start, end) and each kv block its kept q blocks; these arrive in SMEM through
``PrefetchScalarGridSpec``. Step s of the inner axis works on block start + s; the index
maps clamp steps past the range to end - 1, the block already in VMEM, so skipped steps
issue no DMA, and ``pl.when`` skips their compute. Every computed tile applies the causal,
segment and element-wise ACP masks, so the function does not depend on the tiling.

Layout: q, k, v, do are transposed to [B, H, T, Dp] with D padded to a multiple of 128 (the
lane width); k at the query positions (the dQ pass's own keys) is [B, Hkv, T, Dp] like q.
Per-query vectors (c at query positions, lse, dd, g~, dlse, g, the ACP threshold) are
[B, H, T, 1] columns with (bq, 1) blocks; per-key vectors (c at key positions, segment
ids) are [B, H, 1, S] rows with (1, bk) blocks, so bk is a multiple of 128 and bq of 16 (the
bfloat16 sublane tile). Matmuls accumulate in float32 (float32 inputs at full precision).
Padding follows ``gpu.py``: padded keys lie after every real query (the causal mask hides
them), padded queries get do = 0, dd = 0, g~ = 0, dlse = 0, lse = 0, own key 0 and an
edge-replicated c.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.forgetting_attention import common, pruning, tiling
from pallas_kernels.forgetting_attention.common import BlockSizes

# A finite mask value: a fully masked tile gives exp(0) = 1 weights that the first unmasked
# tile's rescaling (exp(_MASK - m) = 0) erases, where -inf would give NaN.
_MASK = -0.7 * float(np.finfo(np.float32).max)
_LANES = 128
_MIN_BQ = 16


def default_block_sizes(head_dim: int) -> BlockSizes:
  """Tiles for TPU VMEM (not tuned on hardware): 256 x 256 everywhere up to D = 128, which
  keeps the double-buffered q, k, v tiles and the f32 [bq, bk] logits far below the default
  scoped VMEM; wider heads halve the q tile."""
  if head_dim <= 128:
    return BlockSizes(block_q=256, block_k=256, block_q_bwd=256, block_k_bwd=256)
  return BlockSizes(block_q=128, block_k=256, block_q_bwd=128, block_k_bwd=256)


def _dot(a, b, ta=False, tb=False):
  """a @ b with float32 accumulation; full float32 products for float32 inputs."""
  ca = 0 if ta else 1
  cb = 1 if tb else 0
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32)


def _masked_logits(q, k, cq_hi, cq_lo, ck_hi, ck_lo, delta, q_pos, k_pos, seg_q, seg_k, scale):
  """Natural-log logits of one tile [bq, bk] f32 with every mask applied, and the diagonal.

  D_ij = (c_hi_i - c_hi_j) + (c_lo_i - c_lo_j) (see ``common``); pairs with D_ij < delta
  (ACP, -inf without pruning), after the query or in another segment get ``_MASK``. The
  masks are phrased as "drop" so that a NaN decay (a NaN gate) is kept and propagates.
  cq_*, delta, q_pos, seg_q are [bq, 1] columns; ck_*, k_pos, seg_k are [1, bk] rows.
  """
  decay = (cq_hi - ck_hi) + (cq_lo - ck_lo)
  s = _dot(q, k, tb=True) * scale + decay
  drop = (decay < delta) | (k_pos > q_pos)
  if seg_q is not None:
    drop = drop | (seg_q != seg_k)
  return jnp.where(drop, _MASK, s), q_pos == k_pos


def _positions(q_first, k_first, bq, bk):
  q_pos = q_first + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  k_pos = k_first + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  return q_pos, k_pos


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, cqh_ref, cql_ref, ckh_ref, ckl_ref,
                delta_ref, *rest, scale, bq, bk, off, nq, nsteps, has_seg):
  if has_seg:
    segq_ref, segk_ref = rest[:2]
    rest = rest[2:]
  o_ref, lse_ref, acc_ref, m_ref, l_ref = rest
  b, h, i, s = (pl.program_id(a) for a in range(4))
  idx = (b * pl.num_programs(1) + h) * nq + i
  kb = start_ref[idx] + s

  @pl.when(s == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  @pl.when(kb < end_ref[idx])
  def _tile():
    q_pos, k_pos = _positions(off + i * bq, kb * bk, bq, bk)
    logits, _ = _masked_logits(
        q_ref[...], k_ref[...], cqh_ref[...], cql_ref[...], ckh_ref[...], ckl_ref[...],
        delta_ref[...], q_pos, k_pos, segq_ref[...] if has_seg else None,
        segk_ref[...] if has_seg else None, scale)  # [bq, bk]
    m = m_ref[...]  # [bq, 1]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new)
    v = v_ref[...]
    l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = acc_ref[...] * alpha + _dot(p.astype(v.dtype), v)
    m_ref[...] = m_new

  @pl.when(s == nsteps - 1)
  def _finish():
    l = l_ref[...]
    l = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc_ref[...] / l).astype(o_ref.dtype)
    lse_ref[...] = m_ref[...] + jnp.log(l)


# ----------------------------------------------------------------------------- backward
#
# As in gpu.py, both kernels use the anchored dS of ``common`` ("anchored dS"):
# X_ij = dP_ij - dd_i is exactly 0 on the diagonal and dS_ij = P_ij (X_ij - g_i). The dQ
# pass forms dS~ from the estimate g~ before its sweep ends and anchors k at the own key,
#
#   dq_i = scale * (sum_{j != i} dS~_ij k_j - (sum_{j != i} dS~_ij - dlse_i) k_i),
#
# with the row sum of dS~ taken over the values the matmul sees (rounded to the input
# dtype); it also sums g_i exactly for the dK/dV pass. Three tile matmuls (QK^T, dO V^T,
# dS~ K); the dK/dV pass has four (QK^T, dO V^T, P^T dO, dS^T Q).


def _dq_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, cqh_ref, cql_ref, ckh_ref, ckl_ref,
               delta_ref, do_ref, lse_ref, dd_ref, gt_ref, dlse_ref, kown_ref, *rest, scale,
               bq, bk, off, nq, nsteps, has_seg):
  if has_seg:
    segq_ref, segk_ref = rest[:2]
    rest = rest[2:]
  dq_ref, g_ref, r_ref, dsk_ref, dsrow_ref, gsum_ref, poff_ref = rest
  b, h, i, s = (pl.program_id(a) for a in range(4))
  idx = (b * pl.num_programs(1) + h) * nq + i
  kb = start_ref[idx] + s

  @pl.when(s == 0)
  def _init():
    dsk_ref[...] = jnp.zeros(dsk_ref.shape, jnp.float32)
    dsrow_ref[...] = jnp.zeros(dsrow_ref.shape, jnp.float32)
    gsum_ref[...] = jnp.zeros(gsum_ref.shape, jnp.float32)
    poff_ref[...] = jnp.zeros(poff_ref.shape, jnp.float32)

  @pl.when(kb < end_ref[idx])
  def _tile():
    q_pos, k_pos = _positions(off + i * bq, kb * bk, bq, bk)
    k = k_ref[...]
    logits, diag = _masked_logits(
        q_ref[...], k, cqh_ref[...], cql_ref[...], ckh_ref[...], ckl_ref[...],
        delta_ref[...], q_pos, k_pos, segq_ref[...] if has_seg else None,
        segk_ref[...] if has_seg else None, scale)
    x = jnp.where(diag, 0.0, _dot(do_ref[...], v_ref[...], tb=True) - dd_ref[...])  # [bq, bk]
    p = jnp.exp(logits - lse_ref[...])
    px = p * x
    # dS~ without the own key's term, which is the k_i part of the anchoring.
    ds = jnp.where(diag, 0.0, px - p * gt_ref[...]).astype(k.dtype)
    dsk_ref[...] += _dot(ds, k)
    dsrow_ref[...] += jnp.sum(ds.astype(jnp.float32), axis=1, keepdims=True)
    gsum_ref[...] += jnp.sum(px, axis=1, keepdims=True)
    poff_ref[...] += jnp.sum(jnp.where(diag, 0.0, p), axis=1, keepdims=True)

  @pl.when(s == nsteps - 1)
  def _finish():
    gsum = gsum_ref[...]
    dlse = dlse_ref[...]
    k_own = kown_ref[...].astype(jnp.float32)  # [bq, Dp]: k at each query's own position
    dq_ref[...] = (scale * (dsk_ref[...] - (dsrow_ref[...] - dlse) * k_own)).astype(dq_ref.dtype)
    g = gsum - dlse
    g_ref[...] = g
    # Row sum of dS without its diagonal: sum_{j != i} P_ij (X_ij - g_i), X_ii = 0.
    r_ref[...] = gsum - g * poff_ref[...]


def _dkv_kernel(start_ref, end_ref, q_ref, k_ref, v_ref, cqh_ref, cql_ref, ckh_ref, ckl_ref,
                delta_ref, do_ref, lse_ref, dd_ref, g_ref, *rest, scale, bq, bk, off, nk,
                nsteps, group, has_seg):
  if has_seg:
    segq_ref, segk_ref = rest[:2]
    rest = rest[2:]
  dk_ref, dv_ref, dc_ref, dk_acc, dv_acc, dc_acc = rest
  b, hkv, j, gi, s = (pl.program_id(a) for a in range(5))
  h = hkv * group + gi
  idx = (b * pl.num_programs(1) * group + h) * nk + j
  qb = start_ref[idx] + s

  @pl.when((gi == 0) & (s == 0))
  def _init_kv():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(s == 0)
  def _init_head():
    dc_acc[...] = jnp.zeros(dc_acc.shape, jnp.float32)

  @pl.when(qb < end_ref[idx])
  def _tile():
    q_pos, k_pos = _positions(off + qb * bq, j * bk, bq, bk)
    q = q_ref[...]
    do = do_ref[...]
    logits, diag = _masked_logits(
        q, k_ref[...], cqh_ref[...], cql_ref[...], ckh_ref[...], ckl_ref[...],
        delta_ref[...], q_pos, k_pos, segq_ref[...] if has_seg else None,
        segk_ref[...] if has_seg else None, scale)
    x = jnp.where(diag, 0.0, _dot(do, v_ref[...], tb=True) - dd_ref[...])  # [bq, bk]
    p = jnp.exp(logits - lse_ref[...])
    ds = p * (x - g_ref[...])
    dv_acc[...] += _dot(p.astype(do.dtype), do, ta=True)
    dk_acc[...] += _dot(ds.astype(q.dtype), q, ta=True)
    # Column sum of dS without its diagonal (the dQ pass's row sums leave it out too).
    dc_acc[...] -= jnp.sum(jnp.where(diag, 0.0, ds), axis=0, keepdims=True)

  @pl.when(s == nsteps - 1)
  def _finish_head():
    dc_ref[...] = dc_acc[...]

  @pl.when((gi == group - 1) & (s == nsteps - 1))
  def _finish_kv():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


class _Geometry(tiling.TileGeometry):
  """Padded sizes and layouts of one pass with q tile ``bq`` and kv tile ``bk``."""

  def __init__(self, q, k, bq, bk):
    super().__init__(q, k, bq, bk, min_bq=_MIN_BQ, min_bk=_LANES,
                     dp=-(-q.shape[-1] // _LANES) * _LANES)

  def pad_q(self, x):  # [B, T, Hq, D] -> [B, Hq, tp, dp]
    return tiling.pad_axis(tiling.pad_axis(x.transpose(0, 2, 1, 3), 2, self.tp), 3, self.dp)

  def pad_kv(self, x):  # [B, S, Hkv, D] -> [B, Hkv, sk, dp]
    return tiling.pad_axis(tiling.pad_axis(x.transpose(0, 2, 1, 3), 2, self.sk), 3, self.dp)

  def own_kv(self, x):  # [B, S, Hkv, D] -> [B, Hkv, tp, dp] at the query positions
    return tiling.pad_axis(tiling.pad_axis(x[:, self.off:].transpose(0, 2, 1, 3), 2, self.tp),
                           3, self.dp)

  def unpad_q(self, x):  # [B, Hq, tp, dp] -> [B, T, Hq, D]
    return x[:, :, :self.T, :self.D].transpose(0, 2, 1, 3)

  def unpad_kv(self, x):  # [B, Hkv, sk, dp] -> [B, S, Hkv, D]
    return x[:, :, :self.S, :self.D].transpose(0, 2, 1, 3)

  def c_cols(self, c):  # [B, S, Hq] -> [B, Hq, tp, 1] at query positions, edge-replicated
    c_q = c.transpose(0, 2, 1)[:, :, self.off:]
    return tiling.pad_axis(c_q, 2, self.tp, mode="edge")[..., None]

  def c_rows(self, c):  # [B, S, Hq] -> [B, Hq, 1, sk] at key positions, edge-replicated
    return tiling.pad_axis(c.transpose(0, 2, 1), 2, self.sk, mode="edge")[:, :, None, :]

  def cols(self, x):  # [B, Hq, T] -> [B, Hq, tp, 1], zero-padded
    return tiling.pad_axis(x.astype(jnp.float32), 2, self.tp)[..., None]

  def seg_cols(self, seg):  # [B, S] -> [B, tp, 1] at query positions
    return tiling.pad_axis(seg[:, self.off:], 1, self.tp, mode="edge")[..., None]

  def seg_rows(self, seg):  # [B, S] -> [B, 1, sk] at key positions
    return tiling.pad_axis(seg, 1, self.sk, mode="edge")[:, None, :]

  def delta_cols(self, delta):  # [B, Hq] or None -> [B, Hq, tp, 1]: each row's ACP threshold
    if delta is None:
      return jnp.full((self.B, self.Hq, self.tp, 1), -jnp.inf, jnp.float32)
    return jnp.broadcast_to(delta.astype(jnp.float32)[:, :, None, None],
                            (self.B, self.Hq, self.tp, 1))


def _clamped(start_ref, end_ref, idx, step):
  """Block start + step, clamped to the range's last block: a step past the range maps to
  the block already loaded, so it costs no DMA (its compute is skipped in the kernel)."""
  return jnp.minimum(start_ref[idx] + step, jnp.maximum(end_ref[idx] - 1, 0))


def _specs(g, has_seg, head, row_block, col_block):
  """BlockSpecs shared by the three kernels: a q-side [bq, Dp] tile, a kv-side [bk, Dp] tile
  (of the q head's kv head), a per-query [bq, 1] column, a per-key [1, bk] row, and the
  segment ids as a column and a row (empty without segments).

  ``head(*ids)`` is the q head of a grid point, ``row_block`` / ``col_block`` its q / kv block.
  """
  qspec = pl.BlockSpec((None, None, g.bq, g.dp), lambda *a: (a[0], head(*a), row_block(*a), 0))
  kvspec = pl.BlockSpec((None, None, g.bk, g.dp),
                        lambda *a: (a[0], tiling.idiv(head(*a), g.group), col_block(*a), 0))
  col = pl.BlockSpec((None, None, g.bq, 1), lambda *a: (a[0], head(*a), row_block(*a), 0))
  row = pl.BlockSpec((None, None, 1, g.bk), lambda *a: (a[0], head(*a), 0, col_block(*a)))
  segs = [pl.BlockSpec((None, g.bq, 1), lambda *a: (a[0], row_block(*a), 0)),
          pl.BlockSpec((None, 1, g.bk), lambda *a: (a[0], 0, col_block(*a)))]
  return qspec, kvspec, col, row, (segs if has_seg else [])


def _interpret(interpret: bool):
  """TPU interpret mode (CPU emulation of the TPU memory spaces, DMAs and semaphores)."""
  return pltpu.InterpretParams() if interpret else False


def _flat(x):
  return x.reshape(-1).astype(jnp.int32)


def forward(q, k, v, c_hi, c_lo, segment_ids, delta, *, sm_scale: float,
            block_sizes: BlockSizes, interpret=False):
  """o [B, T, Hq, D] (q.dtype), lse [B, Hq, T] f32, kept_tiles [B, Hq] i32 and the lse
  again, which is what ``backward`` reads (see ``api``)."""
  g = _Geometry(q, k, block_sizes.block_q, block_sizes.block_k)
  ranges, kept = tiling.forward_ranges(g, c_hi, c_lo, segment_ids, delta, block_sizes)
  has_seg = segment_ids is not None
  nq, Hq = g.nq, g.Hq
  head = lambda b, h, i, s, st, en: h
  row_block = lambda b, h, i, s, st, en: i
  col_block = lambda b, h, i, s, st, en: _clamped(st, en, (b * Hq + h) * nq + i, s)
  qspec, kvspec, col, row, segs = _specs(g, has_seg, head, row_block, col_block)
  args = [g.pad_q(q), g.pad_kv(k), g.pad_kv(v), g.c_cols(c_hi), g.c_cols(c_lo),
          g.c_rows(c_hi), g.c_rows(c_lo), g.delta_cols(delta)]
  in_specs = [qspec, kvspec, kvspec, col, col, row, row, col] + segs
  if has_seg:
    args += [g.seg_cols(segment_ids), g.seg_rows(segment_ids)]
  kernel = functools.partial(_fwd_kernel, scale=sm_scale, bq=g.bq, bk=g.bk, off=g.off, nq=nq,
                             nsteps=g.nk, has_seg=has_seg)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(g.B, Hq, nq, g.nk),
          in_specs=in_specs,
          out_specs=[qspec, col],
          scratch_shapes=[pltpu.VMEM((g.bq, g.dp), jnp.float32),
                          pltpu.VMEM((g.bq, 1), jnp.float32),
                          pltpu.VMEM((g.bq, 1), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((g.B, Hq, g.tp, g.dp), q.dtype),
                 jax.ShapeDtypeStruct((g.B, Hq, g.tp, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret),
      name="forgetting_attention_fwd",
  )(_flat(ranges.kv_start), _flat(ranges.kv_end), *args)
  lse = lse[:, :, :g.T, 0]
  return g.unpad_q(o), lse, kept, lse


def backward(q, k, v, c_hi, c_lo, segment_ids, delta, o, lse, do, dlse, *, sm_scale: float,
             block_sizes: BlockSizes, interpret=False):
  """dq, dk, dv in the inputs' dtypes and dc [B, S, Hq] f32 (see ``api``).

  dS is anchored at each query's own key (see the comment above the backward kernels), and
  dc_t = sum_{j != t} dS_tj - sum_{i != t} dS_it leaves out the diagonal that the row and
  column sums share, which would otherwise cancel when P_tt ~ 1.
  """
  bq, bk = block_sizes.bwd
  g = _Geometry(q, k, bq, bk)
  ranges = pruning.tile_ranges(c_hi, c_lo, segment_ids, g.T, g.bq, g.bk, delta)
  has_seg = segment_ids is not None
  nq, nk, Hq, group = g.nq, g.nk, g.Hq, g.group
  dd = common.own_key_dot(do, v)  # [B, Hq, T]: the anchor of dS
  gt = common.row_term_estimate(o, do, dd, dlse)
  qp, kp, vp, dop = g.pad_q(q), g.pad_kv(k), g.pad_kv(v), g.pad_q(do)
  shared = [qp, kp, vp, g.c_cols(c_hi), g.c_cols(c_lo), g.c_rows(c_hi), g.c_rows(c_lo),
            g.delta_cols(delta)]
  segs = [g.seg_cols(segment_ids), g.seg_rows(segment_ids)] if has_seg else []
  lsep, ddp = g.cols(lse), g.cols(dd)
  static = dict(scale=sm_scale, bq=g.bq, bk=g.bk, off=g.off, has_seg=has_seg)

  # dQ (and g, and the off-diagonal row sums of dS): the forward's grid and tiling.
  head = lambda b, h, i, s, st, en: h
  row_block = lambda b, h, i, s, st, en: i
  col_block = lambda b, h, i, s, st, en: _clamped(st, en, (b * Hq + h) * nq + i, s)
  qspec, kvspec, col, row, seg_specs = _specs(g, has_seg, head, row_block, col_block)
  own = pl.BlockSpec((None, None, g.bq, g.dp),
                     lambda b, h, i, s, st, en: (b, tiling.idiv(h, group), i, 0))
  dq, gp, rp = pl.pallas_call(
      functools.partial(_dq_kernel, nq=nq, nsteps=nk, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(g.B, Hq, nq, nk),
          in_specs=[qspec, kvspec, kvspec, col, col, row, row, col, qspec, col, col, col, col,
                    own] + seg_specs,
          out_specs=[qspec, col, col],
          scratch_shapes=[pltpu.VMEM((g.bq, g.dp), jnp.float32),
                          pltpu.VMEM((g.bq, 1), jnp.float32),
                          pltpu.VMEM((g.bq, 1), jnp.float32),
                          pltpu.VMEM((g.bq, 1), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct((g.B, Hq, g.tp, 1), jnp.float32),
                 jax.ShapeDtypeStruct((g.B, Hq, g.tp, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret),
      name="forgetting_attention_dq",
  )(_flat(ranges.kv_start), _flat(ranges.kv_end), *shared, dop, lsep, ddp, g.cols(gt),
    g.cols(dlse), g.own_kv(k), *segs)

  # dK/dV (+dc): one kv block of one kv head stays put while the inner axes run over the
  # group's q heads and, for each, over that head's kept q blocks.
  Hkv = g.Hkv
  head = lambda b, hk, j, gi, s, st, en: hk * group + gi
  row_block = lambda b, hk, j, gi, s, st, en: _clamped(
      st, en, (b * Hq + hk * group + gi) * nk + j, s)
  col_block = lambda b, hk, j, gi, s, st, en: j
  qspec, kvspec, col, row, seg_specs = _specs(g, has_seg, head, row_block, col_block)
  kvout = pl.BlockSpec((None, None, g.bk, g.dp), lambda b, hk, j, gi, s, st, en: (b, hk, j, 0))
  dk, dv, dc = pl.pallas_call(
      functools.partial(_dkv_kernel, nk=nk, nsteps=nq, group=group, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(g.B, Hkv, nk, group, nq),
          in_specs=[qspec, kvspec, kvspec, col, col, row, row, col, qspec, col, col, col]
          + seg_specs,
          out_specs=[kvout, kvout, row],
          scratch_shapes=[pltpu.VMEM((g.bk, g.dp), jnp.float32),
                          pltpu.VMEM((g.bk, g.dp), jnp.float32),
                          pltpu.VMEM((1, g.bk), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype),
                 jax.ShapeDtypeStruct((g.B, Hq, 1, g.sk), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=_interpret(interpret),
      name="forgetting_attention_dkv",
  )(_flat(ranges.q_start), _flat(ranges.q_end), *shared, dop, lsep, ddp, gp, *segs)
  # Minus the column sums at every key, plus the row sums at the query positions.
  dc = dc[:, :, 0, :g.S].at[:, :, g.off:].add(rp[:, :, :g.T, 0]).transpose(0, 2, 1)
  return g.unpad_q(dq), g.unpad_kv(dk), g.unpad_kv(dv), dc

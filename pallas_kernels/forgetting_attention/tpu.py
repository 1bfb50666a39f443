"""Forgetting attention as Pallas Mosaic kernels (TPU; TPU interpret mode on a CPU).

The passes are ``gpu.py``'s (``tiling``: forward, row sweep in three modes, column sweep,
each on a chunk pair with global positions and the global c, so the single-device op and
the sequence-parallel ring run the same kernels), laid out the TPU way: every tile loop is
a grid axis, and data-dependent tile skipping comes from scalar prefetch.

  forward       grid (B, Hq, q blocks, kv steps):          acc, m, l in VMEM scratch
  row sweep     grid (B, Hq, q blocks, kv steps):          per mode, dS K and the row sums
  column sweep  grid (B, Hkv, kv blocks, group, q steps):  dk, dv across the GQA group's q
                                                           heads; dc per q head

The innermost axes are "arbitrary" (sequential, accumulating in scratch); the others are
"parallel". ``pruning.chunk_tile_ranges`` (causal order of the positions, segments, ACP)
gives each q block its kept kv blocks [start, end) and each kv block its kept q blocks, and
``tiling.full_blocks`` the tiles whose keys all lie strictly before their queries; these
arrive in SMEM through ``PrefetchScalarGridSpec``. Step s of the inner axis works on block
start + s; the index maps clamp steps past the range to end - 1, the block already in VMEM,
so skipped steps issue no DMA, and ``pl.when`` skips their compute. Full tiles (without
segment ids) skip the position masks; every other computed tile masks by position
(pos_q >= pos_k) and segment and finds the own key where pos_q == pos_k; the element-wise
ACP mask applies everywhere, so the function does not depend on the tiling.

Layout: q, k, v, do are transposed to [B, H, T, Dp] with D padded to a multiple of 128 (the
lane width); k at the query positions (the "estimate" sweep's own keys) is [B, Hkv, T, Dp]
like q. Per-query vectors (c at the queries, positions, lse, dd, g, dlse, the ACP threshold)
are [.., T, 1] columns with (bq, 1) blocks; per-key vectors (c at the keys, positions,
segment ids) are [.., 1, S] rows with (1, bk) blocks, so bk is a multiple of 128 and bq of
16 (the bfloat16 sublane tile). Matmuls accumulate in float32 (float32 inputs at full
precision). The log-sum-exp is natural (the chunk contract's units, so nothing converts).
Padding follows ``tiling``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.forgetting_attention import common, tiling
from pallas_kernels.forgetting_attention.common import BlockSizes, Cols, Rows
from pallas_kernels.forgetting_attention.tiling import EXACT, ESTIMATE, ROW_TERMS, Operands

_LANES = 128
_MIN_BQ = 16


def default_block_sizes(head_dim: int) -> BlockSizes:
  """Tiles for TPU VMEM (not tuned on hardware): 256 x 256 everywhere up to D = 128, which
  keeps the double-buffered q, k, v tiles and the f32 [bq, bk] logits far below the default
  scoped VMEM; wider heads halve the q tile."""
  if head_dim <= 128:
    return BlockSizes(block_q=256, block_k=256, block_q_bwd=256, block_k_bwd=256)
  return BlockSizes(block_q=128, block_k=256, block_q_bwd=128, block_k_bwd=256)


def _logits(x: Operands, q, k, scale, masked, has_seg):
  """Natural-log logits of one tile [bq, bk] f32 with its masks applied, and the own-key
  diagonal (None for a full tile, which holds none).

  D_ij = (c_hi_i - c_hi_j) + (c_lo_i - c_lo_j) (see ``common``); pairs with D_ij < delta
  (ACP, -inf without pruning) get ``tiling.MASKED`` in every tile, and in a ``masked`` tile
  also pairs whose key lies after the query or in another segment. The masks are phrased as
  "drop" so that a NaN decay (a NaN gate) is kept and propagates. Query-side operands are
  [bq, 1] columns, key-side ones [1, bk] rows.
  """
  decay = (x.cq_hi[...] - x.ck_hi[...]) + (x.cq_lo[...] - x.ck_lo[...])
  s = tiling.dot(q, k, tb=True) * scale + decay
  drop = decay < x.delta[...]
  diag = None
  if masked:
    q_pos, k_pos = x.q_pos[...], x.k_pos[...]
    drop = drop | (k_pos > q_pos)
    if has_seg:
      drop = drop | (x.seg_q[...] != x.seg_k[...])
    diag = q_pos == k_pos
  return jnp.where(drop, tiling.MASKED, s), diag


def _when_tile(live, full, tile):
  """``tile(masked)`` for a step on a kept tile (``live``): unmasked where ``full`` (None
  with segment ids: every tile masks)."""
  if full is None:
    pl.when(live)(lambda: tile(True))
  else:
    pl.when(live & full)(lambda: tile(False))
    pl.when(live & jnp.logical_not(full))(lambda: tile(True))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(start_ref, end_ref, full_ref, x: Operands, o_ref, lse_ref, acc_ref, m_ref,
                l_ref, *, scale, nq, nsteps, has_seg):
  b, h, i, s = (pl.program_id(a) for a in range(4))
  idx = (b * pl.num_programs(1) + h) * nq + i
  kb = start_ref[idx] + s

  @pl.when(s == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  def tile(masked):
    logits, _ = _logits(x, x.q[...], x.k[...], scale, masked, has_seg)  # [bq, bk]
    m = m_ref[...]  # [bq, 1]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    shift = tiling.safe_max(m_new)
    alpha = jnp.exp(m - shift)
    p = jnp.exp(logits - shift)
    v = x.v[...]
    l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = acc_ref[...] * alpha + tiling.dot(p.astype(v.dtype), v)
    m_ref[...] = m_new

  _when_tile(kb < end_ref[idx], None if has_seg else kb < full_ref[i], tile)

  @pl.when(s == nsteps - 1)
  def _finish():
    # A row that saw no key has l = 0, acc = 0, m = -inf: o = 0 and lse = -inf.
    l = l_ref[...]
    l = jnp.where(l == 0.0, 1.0, l)
    o_ref[...] = (acc_ref[...] / l).astype(o_ref.dtype)
    lse_ref[...] = m_ref[...] + jnp.log(l)


# ----------------------------------------------------------------------------- backward
#
# As in gpu.py, both sweeps use the anchored dS of ``common`` ("anchored dS"):
# X_ij = dP_ij - dd_i is exactly 0 on the diagonal and dS_ij = P_ij (X_ij - g_i). The row
# sweep's modes ("estimate": dS~ from g~ with k anchored at the own key, and the exact row
# sums; "row_terms": the row sums alone; "exact": dq from the exact g_b) are described in
# gpu.py; the arithmetic here is the same, per tile, with scratch accumulators.

# Row-sweep accumulators per mode: dS K [bq, Dp], row sums of dS~, sum P X, sum P (off-diagonal).
_ROW_SCRATCH = {ESTIMATE: ("dsk", "ds_row", "gsum", "p_off"), ROW_TERMS: ("gsum", "p_off"),
                EXACT: ("dsk",)}


def _row_kernel(start_ref, end_ref, full_ref, x: Operands, *refs, scale, nq, nsteps, has_seg,
                mode):
  names = _ROW_SCRATCH[mode]
  n_out = {ESTIMATE: 3, ROW_TERMS: 2, EXACT: 1}[mode]
  outs, acc = refs[:n_out], dict(zip(names, refs[n_out:]))
  b, h, i, s = (pl.program_id(a) for a in range(4))
  idx = (b * pl.num_programs(1) + h) * nq + i
  kb = start_ref[idx] + s

  @pl.when(s == 0)
  def _init():
    for ref in acc.values():
      ref[...] = jnp.zeros(ref.shape, jnp.float32)

  def tile(masked):
    k = x.k[...]
    logits, diag = _logits(x, x.q[...], k, scale, masked, has_seg)
    xx = tiling.dot(x.do[...], x.v[...], tb=True) - x.dd[...]  # X, [bq, bk]
    if masked:
      xx = jnp.where(diag, 0.0, xx)
    p = jnp.exp(logits - x.lse[...])
    if mode != EXACT:
      px = p * xx
      acc["gsum"][...] += jnp.sum(px, axis=1, keepdims=True)
      p_off = jnp.where(diag, 0.0, p) if masked else p
      acc["p_off"][...] += jnp.sum(p_off, axis=1, keepdims=True)
    if mode == ESTIMATE:
      # dS~ without the own key's term, which is the k_i part of the anchoring.
      ds = px - p * x.g[...]
      if masked:
        ds = jnp.where(diag, 0.0, ds)
      ds = ds.astype(k.dtype)
      acc["dsk"][...] += tiling.dot(ds, k)
      acc["ds_row"][...] += jnp.sum(ds.astype(jnp.float32), axis=1, keepdims=True)
    elif mode == EXACT:
      ds = (p * (xx - x.g[...])).astype(k.dtype)
      acc["dsk"][...] += tiling.dot(ds, k)

  _when_tile(kb < end_ref[idx], None if has_seg else kb < full_ref[i], tile)

  @pl.when(s == nsteps - 1)
  def _finish():
    if mode == ESTIMATE:
      dq_ref, gsum_ref, poff_ref = outs
      k_own = x.k_own[...].astype(jnp.float32)  # [bq, Dp]: k at each query's own position
      dq = scale * (acc["dsk"][...] - (acc["ds_row"][...] - x.dlse[...]) * k_own)
      dq_ref[...] = dq.astype(dq_ref.dtype)
    elif mode == ROW_TERMS:
      gsum_ref, poff_ref = outs
    else:
      (dq_ref,) = outs
      dq_ref[...] = (scale * acc["dsk"][...]).astype(dq_ref.dtype)
    if mode != EXACT:
      gsum_ref[...] = acc["gsum"][...]
      poff_ref[...] = acc["p_off"][...]


def _column_kernel(start_ref, end_ref, full_ref, x: Operands, dk_ref, dv_ref, dc_ref, dk_acc,
                   dv_acc, dc_acc, *, scale, nk, nsteps, group, has_seg):
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

  def tile(masked):
    q = x.q[...]
    do = x.do[...]
    logits, diag = _logits(x, q, x.k[...], scale, masked, has_seg)
    xx = tiling.dot(do, x.v[...], tb=True) - x.dd[...]  # [bq, bk]
    if masked:
      xx = jnp.where(diag, 0.0, xx)
    p = jnp.exp(logits - x.lse[...])
    ds = p * (xx - x.g[...])
    dv_acc[...] += tiling.dot(p.astype(do.dtype), do, ta=True)
    dk_acc[...] += tiling.dot(ds.astype(q.dtype), q, ta=True)
    # Column sum of dS without its diagonal (the row terms leave it out too).
    col = jnp.where(diag, 0.0, ds) if masked else ds
    dc_acc[...] -= jnp.sum(col, axis=0, keepdims=True)

  # q blocks from full_ref[j] on lie strictly after the tile's last key.
  _when_tile(qb < end_ref[idx], None if has_seg else qb >= full_ref[j], tile)

  @pl.when(s == nsteps - 1)
  def _finish_head():
    dc_ref[...] = dc_acc[...]

  @pl.when((gi == group - 1) & (s == nsteps - 1))
  def _finish_kv():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- layout


class _Layout(tiling.Geometry):
  """The sizes of one pass and the arrays in the kernels' layout (module docstring)."""

  def __init__(self, rows: Rows, cols: Cols, bq: int, bk: int):
    super().__init__(rows, cols, bq, bk, min_bq=_MIN_BQ, min_bk=_LANES,
                     dp=-(-rows.q.shape[-1] // _LANES) * _LANES)

  def q_side(self, x):  # [B, T, H, D] -> [B, H, tp, dp]
    return tiling.pad_axis(tiling.pad_axis(x.transpose(0, 2, 1, 3), 2, self.tp), 3, self.dp)

  def kv_side(self, x):  # [B, S, Hkv, D] -> [B, Hkv, sk, dp]
    return tiling.pad_axis(tiling.pad_axis(x.transpose(0, 2, 1, 3), 2, self.sk), 3, self.dp)

  def unpad_q(self, x):  # [B, Hq, tp, dp] -> [B, T, Hq, D]
    return x[:, :, :self.T, :self.D].transpose(0, 2, 1, 3)

  def unpad_kv(self, x):  # [B, Hkv, sk, dp] -> [B, S, Hkv, D]
    return x[:, :, :self.S, :self.D].transpose(0, 2, 1, 3)

  def per_query(self, x):  # [B, Hq, T] -> [B, Hq, tp, 1] f32, zero-padded
    return tiling.pad_axis(x.astype(jnp.float32), 2, self.tp)[..., None]

  def operands(self, rows: Rows, cols: Cols, delta) -> Operands:
    """The forward's operands; c and segment ids edge-replicated into the padding."""
    has_seg = rows.seg is not None
    c_q = lambda c: tiling.pad_axis(c.transpose(0, 2, 1), 2, self.tp, mode="edge")[..., None]
    c_k = lambda c: tiling.pad_axis(c.transpose(0, 2, 1), 2, self.sk, mode="edge")[:, :, None]
    if delta is None:
      delta_q = jnp.full((self.B, self.Hq, self.tp, 1), -jnp.inf, jnp.float32)
    else:
      delta_q = jnp.broadcast_to(delta.astype(jnp.float32)[:, :, None, None],
                                 (self.B, self.Hq, self.tp, 1))
    return Operands(
        q=self.q_side(rows.q), k=self.kv_side(cols.k), v=self.kv_side(cols.v),
        cq_hi=c_q(rows.c_hi), cq_lo=c_q(rows.c_lo), ck_hi=c_k(cols.c_hi), ck_lo=c_k(cols.c_lo),
        q_pos=self.q_pos(rows)[:, None], k_pos=self.k_pos(cols)[None, :],
        seg_q=tiling.pad_axis(rows.seg, 1, self.tp, mode="edge")[..., None] if has_seg else None,
        seg_k=tiling.pad_axis(cols.seg, 1, self.sk, mode="edge")[:, None] if has_seg else None,
        delta=delta_q)

  def specs(self, head, row_block, col_block) -> Operands:
    """BlockSpecs of every operand: q-side [bq, Dp] tiles (q, do) of q head ``head(*ids)``
    and block ``row_block(*ids)``, kv-side [bk, Dp] tiles of its kv head and block
    ``col_block(*ids)``, per-query [bq, 1] columns, per-key [1, bk] rows; the own keys are
    the kv head's rows at the q block."""
    group = self.group
    q_tile = pl.BlockSpec((None, None, self.bq, self.dp),
                          lambda *a: (a[0], head(*a), row_block(*a), 0))
    kv_tile = pl.BlockSpec((None, None, self.bk, self.dp),
                           lambda *a: (a[0], tiling.idiv(head(*a), group), col_block(*a), 0))
    col = pl.BlockSpec((None, None, self.bq, 1), lambda *a: (a[0], head(*a), row_block(*a), 0))
    row = pl.BlockSpec((None, None, 1, self.bk), lambda *a: (a[0], head(*a), 0, col_block(*a)))
    return Operands(
        q=q_tile, k=kv_tile, v=kv_tile, cq_hi=col, cq_lo=col, ck_hi=row, ck_lo=row,
        q_pos=pl.BlockSpec((self.bq, 1), lambda *a: (row_block(*a), 0)),
        k_pos=pl.BlockSpec((1, self.bk), lambda *a: (0, col_block(*a))),
        seg_q=pl.BlockSpec((None, self.bq, 1), lambda *a: (a[0], row_block(*a), 0)),
        seg_k=pl.BlockSpec((None, 1, self.bk), lambda *a: (a[0], 0, col_block(*a))),
        delta=col, do=q_tile, lse=col, dd=col, g=col, dlse=col,
        k_own=pl.BlockSpec((None, None, self.bq, self.dp),
                           lambda *a: (a[0], tiling.idiv(head(*a), group), row_block(*a), 0)))

  def row_specs(self) -> Operands:
    """The grid (B, Hq, q blocks, kv steps): kv block = the q block's range start + step."""
    nq, Hq = self.nq, self.Hq
    return self.specs(
        lambda b, h, i, s, st, en, full: h,
        lambda b, h, i, s, st, en, full: i,
        lambda b, h, i, s, st, en, full: _clamped(st, en, (b * Hq + h) * nq + i, s))

  def column_specs(self) -> Operands:
    """The grid (B, Hkv, kv blocks, group, q steps): q head = kv head x group + gi, q block
    = the kv block's range start (for that q head) + step."""
    nk, Hq, group = self.nk, self.Hq, self.group
    return self.specs(
        lambda b, hk, j, gi, s, st, en, full: hk * group + gi,
        lambda b, hk, j, gi, s, st, en, full: _clamped(
            st, en, (b * Hq + hk * group + gi) * nk + j, s),
        lambda b, hk, j, gi, s, st, en, full: j)


def _clamped(start_ref, end_ref, idx, step):
  """Block start + step, clamped to the range's last block: a step past the range maps to
  the block already loaded, so it costs no DMA (its compute is skipped in the kernel)."""
  return jnp.minimum(start_ref[idx] + step, jnp.maximum(end_ref[idx] - 1, 0))


def _interpret(interpret: bool):
  """TPU interpret mode (CPU emulation of the TPU memory spaces, DMAs and semaphores)."""
  return pltpu.InterpretParams() if interpret else False


def _flat(x):
  return x.reshape(-1).astype(jnp.int32)


def _backward_operands(geo: _Layout, rows, cols, delta, do, lse, dd, g):
  return geo.operands(rows, cols, delta)._replace(
      do=geo.q_side(do), lse=geo.per_query(lse), dd=geo.per_query(dd),
      g=None if g is None else geo.per_query(g))


def _full_blocks(geo: _Layout, x: Operands):
  return tiling.full_blocks(x.q_pos[:, 0], x.k_pos[0], geo)


_ROW_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


# ----------------------------------------------------------------------------- passes


def _forward(rows: Rows, cols: Cols, delta, out_dtype, *, sm_scale, block_sizes, interpret):
  """o [B, T, Hq, D] out_dtype, the natural lse [B, Hq, T] and kept tiles [B, Hq]."""
  geo = _Layout(rows, cols, block_sizes.block_q, block_sizes.block_k)
  ranges = tiling.tile_ranges(geo, rows, cols, delta)
  kept = tiling.kept_tiles(geo, ranges, rows, cols, delta, block_sizes)
  x = geo.operands(rows, cols, delta)
  kv_full, _ = _full_blocks(geo, x)
  specs = geo.row_specs()
  kernel = functools.partial(_fwd_kernel, scale=sm_scale, nq=geo.nq, nsteps=geo.nk,
                             has_seg=rows.seg is not None)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(geo.B, geo.Hq, geo.nq, geo.nk),
          in_specs=[tiling.present(specs, x)],
          out_specs=[specs.q, specs.lse],
          scratch_shapes=[pltpu.VMEM((geo.bq, geo.dp), jnp.float32),
                          pltpu.VMEM((geo.bq, 1), jnp.float32),
                          pltpu.VMEM((geo.bq, 1), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((geo.B, geo.Hq, geo.tp, geo.dp), out_dtype),
                 jax.ShapeDtypeStruct((geo.B, geo.Hq, geo.tp, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=_ROW_SEMANTICS),
      interpret=_interpret(interpret),
      name="forgetting_attention_fwd",
  )(_flat(ranges.kv_start), _flat(ranges.kv_end), kv_full, x)
  return geo.unpad_q(o), lse[:, :, :geo.T, 0], kept


def _row_sweep(mode, rows: Rows, cols: Cols, delta, do, lse, dd, g, dlse, k_own, *, sm_scale,
               block_sizes, interpret):
  """The row sweep in ``mode`` (see ``tiling``): "estimate" -> dq (q.dtype), gsum, p_off;
  "row_terms" -> gsum, p_off; "exact" -> dq (float32); sums [B, Hq, T]."""
  geo = _Layout(rows, cols, *block_sizes.bwd)
  ranges = tiling.tile_ranges(geo, rows, cols, delta)
  x = _backward_operands(geo, rows, cols, delta, do, lse, dd, g)
  if mode == ESTIMATE:
    x = x._replace(dlse=geo.per_query(dlse), k_own=geo.q_side(k_own))
  kv_full, _ = _full_blocks(geo, x)
  specs = geo.row_specs()
  sd = jax.ShapeDtypeStruct
  dq_shape = sd((geo.B, geo.Hq, geo.tp, geo.dp),
                rows.q.dtype if mode == ESTIMATE else jnp.float32)
  sum_shape = sd((geo.B, geo.Hq, geo.tp, 1), jnp.float32)
  shapes = {ESTIMATE: [dq_shape, sum_shape, sum_shape], ROW_TERMS: [sum_shape, sum_shape],
            EXACT: [dq_shape]}[mode]
  scratch = [pltpu.VMEM((geo.bq, geo.dp) if n == "dsk" else (geo.bq, 1), jnp.float32)
             for n in _ROW_SCRATCH[mode]]
  outs = pl.pallas_call(
      functools.partial(_row_kernel, scale=sm_scale, nq=geo.nq, nsteps=geo.nk,
                        has_seg=rows.seg is not None, mode=mode),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(geo.B, geo.Hq, geo.nq, geo.nk),
          in_specs=[tiling.present(specs, x)],
          out_specs=[specs.q if s is dq_shape else specs.lse for s in shapes],
          scratch_shapes=scratch),
      out_shape=shapes,
      compiler_params=pltpu.CompilerParams(dimension_semantics=_ROW_SEMANTICS),
      interpret=_interpret(interpret),
      name={ESTIMATE: "forgetting_attention_dq", ROW_TERMS: "forgetting_attention_row_terms",
            EXACT: "forgetting_attention_dq_exact"}[mode],
  )(_flat(ranges.kv_start), _flat(ranges.kv_end), kv_full, x)
  outs = [a[:, :, :geo.T, 0] if a.shape[-1] == 1 else geo.unpad_q(a) for a in outs]
  return outs[0] if mode == EXACT else tuple(outs)


def _column_sweep(rows: Rows, cols: Cols, delta, do, lse, dd, g_b, out_dtype, *, sm_scale,
                  block_sizes, interpret):
  """dk, dv [B, S, Hkv, D] out_dtype and dc_col [B, S, Hq] f32: one kv block of one kv head
  stays put while the inner axes run over the group's q heads and, for each, over that
  head's kept q blocks."""
  geo = _Layout(rows, cols, *block_sizes.bwd)
  ranges = tiling.tile_ranges(geo, rows, cols, delta)
  x = _backward_operands(geo, rows, cols, delta, do, lse, dd, g_b)
  _, q_full = _full_blocks(geo, x)
  specs = geo.column_specs()
  kv_out = pl.BlockSpec((None, None, geo.bk, geo.dp),
                        lambda b, hk, j, gi, s, st, en, full: (b, hk, j, 0))
  kv_shape = jax.ShapeDtypeStruct((geo.B, geo.Hkv, geo.sk, geo.dp), out_dtype)
  dk, dv, dc = pl.pallas_call(
      functools.partial(_column_kernel, scale=sm_scale, nk=geo.nk, nsteps=geo.nq,
                        group=geo.group, has_seg=rows.seg is not None),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(geo.B, geo.Hkv, geo.nk, geo.group, geo.nq),
          in_specs=[tiling.present(specs, x)],
          out_specs=[kv_out, kv_out, specs.ck_hi],
          scratch_shapes=[pltpu.VMEM((geo.bk, geo.dp), jnp.float32),
                          pltpu.VMEM((geo.bk, geo.dp), jnp.float32),
                          pltpu.VMEM((1, geo.bk), jnp.float32)]),
      out_shape=[kv_shape, kv_shape,
                 jax.ShapeDtypeStruct((geo.B, geo.Hq, 1, geo.sk), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=_interpret(interpret),
      name="forgetting_attention_dkv",
  )(_flat(ranges.q_start), _flat(ranges.q_end), q_full, x)
  return geo.unpad_kv(dk), geo.unpad_kv(dv), dc[:, :, 0, :geo.S].transpose(0, 2, 1)


def _passes(sm_scale: float, block_sizes: BlockSizes, interpret: bool) -> tiling.Passes:
  kw = dict(sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)
  return tiling.Passes(functools.partial(_row_sweep, **kw), functools.partial(_column_sweep, **kw),
                       to_res=lambda lse: lse.astype(jnp.float32))


# ----------------------------------------------------------------------------- the module's api


def forward(q, k, v, c_hi, c_lo, segment_ids, delta, *, sm_scale: float,
            block_sizes: BlockSizes, interpret=False):
  """o [B, T, Hq, D] (q.dtype), lse [B, Hq, T] f32, kept_tiles [B, Hq] i32 and the lse
  again, which is what ``backward`` reads (see ``api``): the chunk pair
  ``common.whole_sequence``."""
  rows, cols = common.whole_sequence(q, k, v, c_hi, c_lo, segment_ids)
  o, lse, kept = _forward(rows, cols, delta, q.dtype, sm_scale=sm_scale,
                          block_sizes=block_sizes, interpret=interpret)
  return o, lse, kept, lse


def backward(q, k, v, c_hi, c_lo, segment_ids, delta, o, lse, do, dlse, *, sm_scale: float,
             block_sizes: BlockSizes, interpret=False):
  """dq, dk, dv in the inputs' dtypes and dc [B, S, Hq] f32 (see ``api`` and
  ``tiling.single_device_backward``)."""
  return tiling.single_device_backward(_passes(sm_scale, block_sizes, interpret), q, k, v, c_hi,
                                       c_lo, segment_ids, delta, o, lse, do, dlse)


def forward_chunk(rows: Rows, cols: Cols, delta, *, sm_scale: float, block_sizes: BlockSizes,
                  interpret: bool = False):
  """The queries of ``rows`` against the keys of ``cols`` alone, at any global positions:
  o [B, T, Hq, D] float32 normalised over these keys, their lse [B, Hq, T] (-inf where a
  query sees none of them, o = 0 there) and the kept tiles [B, Hq] int32; the contract of
  ``xla.forward_chunk``."""
  tiling.check_chunks(rows, cols, "forward_chunk")
  return _forward(rows, cols, delta, jnp.float32, sm_scale=sm_scale, block_sizes=block_sizes,
                  interpret=interpret)


row_terms_chunk, backward_chunk = tiling.backward_chunk_kernels(_passes)

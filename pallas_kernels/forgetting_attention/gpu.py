"""Forgetting attention as Pallas kernels lowered to Triton (GPU; interpret mode on a CPU).

Three kernels, none with atomics:

  forward  grid (q blocks, B, Hq):  online softmax over the kept kv tiles of one q block.
  dQ       grid (q blocks, B, Hq):  loops over the kept kv tiles of one q block; also writes
           the row term g of the anchored dS and the row sums of dS (see the comment above
           the backward kernels).
  dK/dV    grid (kv blocks, B, Hkv): one kv tile stays on chip while the kernel loops over
           the q heads of its GQA group and, for each, over that head's kept q tiles; it
           also writes dc = -(column sums of dS) per q head. Runs after dQ (it reads g).

Every loop runs over a dynamic tile range from ``pruning.tile_ranges`` (causal diagonal,
segment boundaries, ACP), so skipped tiles are never loaded. Inside a range, tiles that lie
fully below the diagonal skip the element-wise mask; the others mask causally and by segment.
The forward uses ``block_q x block_k`` tiles, both backward kernels ``block_q_bwd x block_k_bwd``.

Logits are kept in base 2: s2 = log2(e) * (scale * q.k + D) with
D_ij = (c_hi_i - c_hi_j) + (c_lo_i - c_lo_j) (see ``common``), so one exp2 per element. The
backward reads the forward's base-2 log-sum-exp lse2 = m + log2(l) as the forward computed
it, and recomputes P = exp2(s2 - lse2) from the same s2: converting lse2 to natural log and
back would round it twice, and P inherits that absolute error of ~|lse2| 2^-23, a relative
error of 1e-4 at logits ~1e3 (inf at ~1e9). The natural lse is for the stats only.
Float32 inputs use full float32 products (no tf32); bf16 / f16 feed the tensor cores with
float32 accumulation.

Padding happens here, not in the kernels: T and S are padded to whole tiles and D to a
power of two (at least 16, the smallest Triton dot). Padded keys come after every real
query, so the causal mask hides them; padded queries get do = 0, dd = 0, dlse = 0, lse = 0
and an edge-replicated c, which keeps their logits finite and their gradient contributions
zero. Works with JAX 0.10 and 0.11 (``_launch`` picks the Triton compiler-params class).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.forgetting_attention import common, pruning, tiling
from pallas_kernels.forgetting_attention.common import BlockSizes

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# A finite mask value: a fully masked tile gives exp2(0) = 1 weights that the first unmasked
# tile's rescaling (exp2(_MASK - m) = 0) erases, where -inf would give NaN.
_MASK = -0.7 * float(np.finfo(np.float32).max)
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


def _dot(a, b, ta=False, tb=False):
  """a @ b with float32 accumulation; full float32 products (no tf32) for float32 inputs."""
  ca = 0 if ta else 1
  cb = 1 if tb else 0
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32)


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
  s = _dot(q, k, tb=True) * qk_scale + decay * _LOG2E
  return jnp.where(decay < delta[:, None], _MASK, s)


def _mask(s, q_pos, k_pos, seg_q, seg_k):
  keep = k_pos[None, :] <= q_pos[:, None]
  if seg_q is not None:
    keep = keep & (seg_q[:, None] == seg_k[None, :])
  return jnp.where(keep, s, _MASK)


def _split(start, end, boundary):
  """The boundary clipped into [start, end): the loop splits there into two parts."""
  return jnp.minimum(jnp.maximum(boundary, start), end)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(kvs_ref, kve_ref, q_ref, k_ref, v_ref, chi_ref, clo_ref, *rest, scale, bq,
                bk, off, has_seg):
  seg_ref = rest[0] if has_seg else None
  delta = rest[int(has_seg)][...]  # [bq]
  o_ref, lse_ref = rest[-2:]
  i = pl.program_id(0)
  start, end = kvs_ref[i], kve_ref[i]
  q_first = off + i * bq
  q = q_ref[...]  # [bq, Dp]
  cq_hi = chi_ref[pl.ds(q_first, bq)]  # [bq]
  cq_lo = clo_ref[pl.ds(q_first, bq)]
  q_pos = q_first + jnp.arange(bq)
  seg_q = seg_ref[pl.ds(q_first, bq)] if has_seg else None
  qk_scale = scale * _LOG2E

  def body(kb, carry, masked):
    acc, m, l = carry
    ks = pl.ds(kb * bk, bk)
    k = k_ref[ks, :]  # [bk, Dp]
    v = v_ref[ks, :]
    s = _logits(q, k, cq_hi, cq_lo, chi_ref[ks], clo_ref[ks], qk_scale, delta)  # [bq, bk]
    if masked:
      s = _mask(s, q_pos, kb * bk + jnp.arange(bk), seg_q, seg_ref[ks] if has_seg else None)
    # Triton lowers max to maxnumf, which skips NaN; a NaN logit still reaches l and acc
    # through its own p = exp2(NaN - m), so NaN input gives a NaN row, not a dropped pair.
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  # Tiles whose last key is at or before the block's first query need no mask.
  mid = start if has_seg else _split(start, end, tiling.idiv(q_first + 1, bk))
  carry = lax.fori_loop(start, mid, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(mid, end, functools.partial(body, masked=True), carry)
  l = jnp.where(l == 0.0, 1.0, l)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)  # base 2: the backward's P must see these very bits


# ----------------------------------------------------------------------------- backward
#
# Both kernels use the anchored dS of ``common`` ("anchored dS"): X_ij = dP_ij - dd_i is
# exactly 0 on the diagonal and dS_ij = P_ij (X_ij - g_i). The dQ pass sums g_i exactly over
# its row (for the dK/dV pass, which runs after it) but must form dS before the sweep ends,
# so it uses the estimate g~ and anchors k at the own key:
#
#   dq_i = scale * (sum_{j != i} dS~_ij k_j - (sum_{j != i} dS~_ij - dlse_i) k_i),
#
# off by (g_i - g~_i) sum_{j != i} P_ij (k_j - k_i), which vanishes with 1 - P_ii. The row
# sum of dS~ is taken over the values the matmul sees (rounded to the input dtype), so the
# two terms cancel exactly where the keys are alike. Three tile matmuls (QK^T, dO V^T,
# dS~ K); the dK/dV pass has four (QK^T, dO V^T, P^T dO, dS^T Q).


def _dq_kernel(kvs_ref, kve_ref, q_ref, k_ref, v_ref, kown_ref, chi_ref, clo_ref, do_ref,
               lse_ref, dd_ref, gt_ref, dlse_ref, *rest, scale, bq, bk, off, has_seg):
  seg_ref = rest[0] if has_seg else None
  delta = rest[int(has_seg)][...]  # [bq]
  dq_ref, g_ref, r_ref = rest[-3:]
  i = pl.program_id(0)
  start, end = kvs_ref[i], kve_ref[i]
  q_first = off + i * bq
  q = q_ref[...]  # [bq, Dp]
  do = do_ref[...]
  lse2 = lse_ref[...]  # [bq], base 2 as the forward computed it
  dd = dd_ref[...]
  gt = gt_ref[...]  # the estimate g~
  cq_hi = chi_ref[pl.ds(q_first, bq)]
  cq_lo = clo_ref[pl.ds(q_first, bq)]
  q_pos = q_first + jnp.arange(bq)
  seg_q = seg_ref[pl.ds(q_first, bq)] if has_seg else None
  qk_scale = scale * _LOG2E

  def body(kb, carry, masked):
    dsk, ds_row, gsum, p_off = carry
    ks = pl.ds(kb * bk, bk)
    k = k_ref[ks, :]
    v = v_ref[ks, :]
    s = _logits(q, k, cq_hi, cq_lo, chi_ref[ks], clo_ref[ks], qk_scale, delta)
    x = _dot(do, v, tb=True) - dd[:, None]  # [bq, bk]
    if masked:
      k_pos = kb * bk + jnp.arange(bk)
      s = _mask(s, q_pos, k_pos, seg_q, seg_ref[ks] if has_seg else None)
      diag = q_pos[:, None] == k_pos[None, :]
      x = jnp.where(diag, 0.0, x)
    p = jnp.exp2(s - lse2[:, None])  # [bq, bk]
    px = p * x
    ds = px - p * gt[:, None]
    if masked:  # the own key's term is the k_i part of the anchoring
      ds = jnp.where(diag, 0.0, ds)
      p = jnp.where(diag, 0.0, p)
    ds = ds.astype(k.dtype)
    return (dsk + _dot(ds, k), ds_row + jnp.sum(ds.astype(jnp.float32), axis=1),
            gsum + jnp.sum(px, axis=1), p_off + jnp.sum(p, axis=1))

  zrow = jnp.zeros((bq,), jnp.float32)
  carry = (jnp.zeros(q.shape, jnp.float32), zrow, zrow, zrow)
  mid = start if has_seg else _split(start, end, tiling.idiv(q_first + 1, bk))
  carry = lax.fori_loop(start, mid, functools.partial(body, masked=False), carry)
  dsk, ds_row, gsum, p_off = lax.fori_loop(mid, end, functools.partial(body, masked=True), carry)
  dlse = dlse_ref[...]
  k_own = kown_ref[...].astype(jnp.float32)  # [bq, Dp]: k at each query's own position
  dq_ref[...] = (scale * (dsk - (ds_row - dlse)[:, None] * k_own)).astype(dq_ref.dtype)
  g = gsum - dlse
  g_ref[...] = g
  # Row sum of dS without its diagonal: sum_{j != i} P_ij (X_ij - g_i), X_ii = 0.
  r_ref[...] = gsum - g * p_off


def _dkv_kernel(qs_ref, qe_ref, q_ref, k_ref, v_ref, chi_ref, clo_ref, do_ref, lse_ref,
                dd_ref, g_ref, *rest, scale, bq, bk, off, group, has_seg):
  seg_ref = rest[0] if has_seg else None
  delta_ref = rest[int(has_seg)]  # [Hq, tp]
  dk_ref, dv_ref, dc_ref = rest[-3:]
  j = pl.program_id(0)
  hkv = pl.program_id(2)
  k = k_ref[...]  # [bk, Dp]
  v = v_ref[...]
  ks = pl.ds(j * bk, bk)
  k_pos = j * bk + jnp.arange(bk)
  seg_k = seg_ref[ks] if has_seg else None
  qk_scale = scale * _LOG2E
  # q blocks from this index on lie entirely after the tile's last key: no mask needed.
  first_unmasked = tiling.idiv(jnp.maximum((j + 1) * bk - off - 1 + bq - 1, 0), bq)

  def head(gi, carry):
    dk, dv = carry
    h = hkv * group + gi
    ck_hi = chi_ref[h, ks]  # [bk]
    ck_lo = clo_ref[h, ks]
    start, end = qs_ref[h, j], qe_ref[h, j]

    def body(a, inner, masked):
      dk, dv, dcol = inner
      qsl = pl.ds(a * bq, bq)
      q_first = off + a * bq
      q = q_ref[qsl, h, :]  # [bq, Dp]
      do = do_ref[qsl, h, :]
      lse2 = lse_ref[h, qsl]  # [bq], base 2
      dd = dd_ref[h, qsl]
      g = g_ref[h, qsl]
      cs = pl.ds(q_first, bq)
      delta = delta_ref[h, qsl]
      s = _logits(q, k, chi_ref[h, cs], clo_ref[h, cs], ck_hi, ck_lo, qk_scale, delta)
      x = _dot(do, v, tb=True) - dd[:, None]  # [bq, bk]
      if masked:
        q_pos = q_first + jnp.arange(bq)
        s = _mask(s, q_pos, k_pos, seg_ref[cs] if has_seg else None, seg_k)
        diag = q_pos[:, None] == k_pos[None, :]
        x = jnp.where(diag, 0.0, x)
      p = jnp.exp2(s - lse2[:, None])
      ds = p * (x - g[:, None])
      dv = dv + _dot(p.astype(do.dtype), do, ta=True)
      dk = dk + _dot(ds.astype(q.dtype), q, ta=True)
      # Column sum of dS without its diagonal (the row sums in dq's pass leave it out too).
      col = jnp.sum(jnp.where(diag, 0.0, ds) if masked else ds, axis=0)
      return dk, dv, dcol - col

    inner = (dk, dv, jnp.zeros((bk,), jnp.float32))
    mid = end if has_seg else _split(start, end, first_unmasked)
    inner = lax.fori_loop(start, mid, functools.partial(body, masked=True), inner)
    dk, dv, dcol = lax.fori_loop(mid, end, functools.partial(body, masked=False), inner)
    dc_ref[h, :] = dcol
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrappers


class _Geometry(tiling.TileGeometry):
  """Padded sizes and layouts of one pass with q tile ``bq`` and kv tile ``bk``."""

  def __init__(self, q, k, bq, bk):
    super().__init__(q, k, bq, bk, min_bq=_MIN_BLOCK, min_bk=_MIN_BLOCK,
                     dp=max(_MIN_BLOCK, tiling.next_pow2(q.shape[-1])))
    # c and segment ids are read at key positions and at query positions off + [0, tp).
    self.sc = max(self.off + self.tp, self.sk)

  def pad_q(self, x):  # [B, T, Hq, D] -> [B, tp, Hq, dp]
    return tiling.pad_axis(tiling.pad_axis(x, 1, self.tp), 3, self.dp)

  def pad_kv(self, x):  # [B, S, Hkv, D] -> [B, sk, Hkv, dp]
    return tiling.pad_axis(tiling.pad_axis(x, 1, self.sk), 3, self.dp)

  def own_kv(self, x):  # [B, S, Hkv, D] -> [B, tp, Hkv, dp] at the query positions
    return tiling.pad_axis(tiling.pad_axis(x[:, self.off:], 1, self.tp), 3, self.dp)

  def pad_c(self, c):  # [B, S, Hq] -> [B, Hq, sc], edge-replicated
    return tiling.pad_axis(c.transpose(0, 2, 1), 2, self.sc, mode="edge")

  def pad_rows(self, x):  # [B, Hq, T] -> [B, Hq, tp]
    return tiling.pad_axis(x, 2, self.tp)

  def pad_seg(self, seg):  # [B, S] -> [B, sc], edge-replicated
    return tiling.pad_axis(seg, 1, self.sc, mode="edge")

  def delta_rows(self, delta):  # [B, Hq] or None -> [B, Hq, tp]: each row's ACP threshold
    if delta is None:
      return jnp.full((self.B, self.Hq, self.tp), -jnp.inf, jnp.float32)
    return jnp.broadcast_to(delta.astype(jnp.float32)[:, :, None], (self.B, self.Hq, self.tp))


def forward(q, k, v, c_hi, c_lo, segment_ids, delta, *, sm_scale: float,
            block_sizes: BlockSizes, interpret: bool = False):
  """o [B, T, Hq, D] (q.dtype), lse [B, Hq, T] f32, kept_tiles [B, Hq] i32 and lse2 [B, Hq, T]
  f32, the base-2 log-sum-exp that ``backward`` reads (see ``api``)."""
  g = _Geometry(q, k, block_sizes.block_q, block_sizes.block_k)
  ranges, kept = tiling.forward_ranges(g, c_hi, c_lo, segment_ids, delta, block_sizes)
  has_seg = segment_ids is not None
  group = g.group
  q_spec = pl.BlockSpec((None, g.bq, None, g.dp), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, g.sk, None, g.dp), lambda i, b, h: (b, 0, h // group, 0))
  c_spec = pl.BlockSpec((None, None, g.sc), lambda i, b, h: (b, h, 0))
  r_spec = pl.BlockSpec((None, None, g.nq), lambda i, b, h: (b, h, 0))
  row_spec = pl.BlockSpec((None, None, g.bq), lambda i, b, h: (b, h, i))
  in_specs = [r_spec, r_spec, q_spec, kv_spec, kv_spec, c_spec, c_spec]
  args = [ranges.kv_start, ranges.kv_end, g.pad_q(q), g.pad_kv(k), g.pad_kv(v),
          g.pad_c(c_hi), g.pad_c(c_lo)]
  if has_seg:
    in_specs.append(pl.BlockSpec((None, g.sc), lambda i, b, h: (b, 0)))
    args.append(g.pad_seg(segment_ids))
  in_specs.append(row_spec)
  args.append(g.delta_rows(delta))
  kernel = functools.partial(_fwd_kernel, scale=sm_scale, bq=g.bq, bk=g.bk, off=g.off,
                             has_seg=has_seg)
  o, lse = pl.pallas_call(
      kernel,
      grid=(g.nq, g.B, g.Hq),
      in_specs=in_specs,
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct((g.B, g.tp, g.Hq, g.dp), q.dtype),
                 jax.ShapeDtypeStruct((g.B, g.Hq, g.tp), jnp.float32)],
      compiler_params=_launch(_warps(block_sizes, g.bq, g.bk, g.dp), _stages(block_sizes, g.dp)),
      interpret=interpret,
      name="forgetting_attention_fwd",
  )(*args)
  lse2 = lse[:, :, :g.T]
  return o[:, :g.T, :, :g.D], lse2 * _LN2, kept, lse2


def backward(q, k, v, c_hi, c_lo, segment_ids, delta, o, lse2, do, dlse, *, sm_scale: float,
             block_sizes: BlockSizes, interpret: bool = False):
  """dq, dk, dv in the inputs' dtypes and dc [B, S, Hq] f32 (see ``api``); lse2 is the
  forward's base-2 log-sum-exp.

  dS is anchored at each query's own key (see the comment above the backward kernels), and
  dc_t = sum_{j != t} dS_tj - sum_{i != t} dS_it leaves out the diagonal that the row and
  column sums share, which would otherwise cancel when P_tt ~ 1.
  """
  bq, bk = block_sizes.bwd
  g = _Geometry(q, k, bq, bk)
  ranges = pruning.tile_ranges(c_hi, c_lo, segment_ids, g.T, g.bq, g.bk, delta)
  has_seg = segment_ids is not None
  group = g.group
  qp, kp, vp, dop = g.pad_q(q), g.pad_kv(k), g.pad_kv(v), g.pad_q(do)
  chi, clo = g.pad_c(c_hi), g.pad_c(c_lo)
  dd = common.own_key_dot(do, v)  # [B, Hq, T]: the anchor of dS
  gt = common.row_term_estimate(o, do, dd, dlse)
  lsep, ddp, dlsep = g.pad_rows(lse2), g.pad_rows(dd), g.pad_rows(dlse.astype(jnp.float32))
  segp = g.pad_seg(segment_ids) if has_seg else None
  params = _launch(_warps(block_sizes, g.bq, g.bk, g.dp), _stages(block_sizes, g.dp))
  static = dict(scale=sm_scale, bq=g.bq, bk=g.bk, off=g.off, has_seg=has_seg)
  deltap = g.delta_rows(delta)

  # dQ (and g): one q block of one q head per program, looping over its kept kv tiles.
  q_spec = pl.BlockSpec((None, g.bq, None, g.dp), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, g.sk, None, g.dp), lambda i, b, h: (b, 0, h // group, 0))
  c_spec = pl.BlockSpec((None, None, g.sc), lambda i, b, h: (b, h, 0))
  row_spec = pl.BlockSpec((None, None, g.bq), lambda i, b, h: (b, h, i))
  r_spec = pl.BlockSpec((None, None, g.nq), lambda i, b, h: (b, h, 0))
  own_spec = pl.BlockSpec((None, g.bq, None, g.dp), lambda i, b, h: (b, i, h // group, 0))
  in_specs = [r_spec, r_spec, q_spec, kv_spec, kv_spec, own_spec, c_spec, c_spec, q_spec,
              row_spec, row_spec, row_spec, row_spec]
  args = [ranges.kv_start, ranges.kv_end, qp, kp, vp, g.own_kv(k), chi, clo, dop, lsep, ddp,
          g.pad_rows(gt), dlsep]
  if has_seg:
    in_specs.append(pl.BlockSpec((None, g.sc), lambda i, b, h: (b, 0)))
    args.append(segp)
  in_specs.append(row_spec)
  args.append(deltap)
  dq, gp, rp = pl.pallas_call(
      functools.partial(_dq_kernel, **static),
      grid=(g.nq, g.B, g.Hq),
      in_specs=in_specs,
      out_specs=[q_spec, row_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                 jax.ShapeDtypeStruct((g.B, g.Hq, g.tp), jnp.float32),
                 jax.ShapeDtypeStruct((g.B, g.Hq, g.tp), jnp.float32)],
      compiler_params=params,
      interpret=interpret,
      name="forgetting_attention_dq",
  )(*args)

  # dK/dV (+dc): one kv block of one kv head per program, looping over the group's q heads.
  qall_spec = pl.BlockSpec((None, g.tp, g.Hq, g.dp), lambda j, b, h: (b, 0, 0, 0))
  kvb_spec = pl.BlockSpec((None, g.bk, None, g.dp), lambda j, b, h: (b, j, h, 0))
  call_spec = pl.BlockSpec((None, g.Hq, g.sc), lambda j, b, h: (b, 0, 0))
  rows_spec = pl.BlockSpec((None, g.Hq, g.tp), lambda j, b, h: (b, 0, 0))
  rk_spec = pl.BlockSpec((None, g.Hq, g.nk), lambda j, b, h: (b, 0, 0))
  in_specs = [rk_spec, rk_spec, qall_spec, kvb_spec, kvb_spec, call_spec, call_spec,
              qall_spec, rows_spec, rows_spec, rows_spec]
  args = [ranges.q_start, ranges.q_end, qp, kp, vp, chi, clo, dop, lsep, ddp, gp]
  if has_seg:
    in_specs.append(pl.BlockSpec((None, g.sc), lambda j, b, h: (b, 0)))
    args.append(segp)
  in_specs.append(rows_spec)
  args.append(deltap)
  dk, dv, dc = pl.pallas_call(
      functools.partial(_dkv_kernel, group=group, **static),
      grid=(g.nk, g.B, g.Hkv),
      in_specs=in_specs,
      out_specs=[kvb_spec, kvb_spec, pl.BlockSpec((None, g.Hq, g.bk), lambda j, b, h: (b, 0, j))],
      out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype),
                 jax.ShapeDtypeStruct((g.B, g.Hq, g.sk), jnp.float32)],
      compiler_params=params,
      interpret=interpret,
      name="forgetting_attention_dkv",
  )(*args)
  # Minus the column sums at every key, plus the row sums at the query positions.
  dc = dc[:, :, :g.S].at[:, :, g.off:].add(rp[:, :, :g.T]).transpose(0, 2, 1)  # [B, S, Hq]
  return dq[:, :g.T, :, :g.D], dk[:, :g.S, :, :g.D], dv[:, :g.S, :, :g.D], dc

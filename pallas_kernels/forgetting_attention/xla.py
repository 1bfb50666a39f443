"""Blockwise (flash) forgetting attention in plain JAX: runs on every backend, memory linear in T.

The forward pass keeps an online softmax (running max ``m``, denominator ``l``, output
accumulator) per query block and walks the key blocks of that query block's kept range; the
backward pass walks key blocks and, inside, the query blocks that see them, recomputing the
probabilities tile by tile from the saved log-sum-exp. No [T, S] array is ever formed: the
largest temporaries are one [B, Hkv, G, block_q, block_k] tile and the linear-size inputs,
outputs and accumulators.

Layout: heads are vectorised as [B, Hkv, G] with G = Hq // Hkv, so GQA never repeats k or v.
Each query/key block is addressed by its block index on a leading axis ([n, B, Hkv, ...]).

Every pass works on a chunk pair (``common.Rows`` against ``common.Cols``): queries and keys
anywhere in the sequence, masked by their global positions and biased by the global c, so
the same code computes the single-device op (``forward``, ``backward``: the queries are the
last T of the S keys) and one step of a sequence-parallel ring (``forward_chunk``,
``row_terms_chunk``, ``backward_chunk``). T and S are padded to whole blocks inside and the
padding is masked: padded queries get position -1 and padded keys the largest int32, so no
query sees a padded key and no padded query sees a key.

Tile skipping comes from :func:`pruning.tile_ranges` alone. The loops run over the union of
the kept ranges of all (batch, head) pairs, so a tile that no head keeps is neither loaded nor
computed; a tile that some heads keep and others do not is masked for the others, so every
skipped tile contributes exactly zero. Inside a tile the mask is element-wise (causal, segment,
and D_ij >= delta when pruning), which makes the result the reference's function exactly:
the reference with ``prune_threshold=delta`` drops the same pairs.

The backward anchors dS at each query's own key (see :func:`backward`), so that under
strong forgetting, where P_ii ~ 1 and the usual rowsum(o * dO) cancels, the gradients keep
float32 relative precision.

No gate. With ``c_hi = c_lo = None`` (static: the chunk's ``Rows`` / ``Cols`` carry no c)
the same loops compute plain causal softmax attention (log f = 0, D_ij = 0): no decay is
loaded, formed or added, and :func:`plain_backward` is the textbook flash backward, dS =
P (dP - Delta) with Delta_i = dO_i . o_i, in one pass (no row-terms pass, no dc): the
anchoring exists for P_ii ~ 1 under strong forgetting, which a gate of 1 never forces. This
is the ``xla`` line of the plain implementations (``registry.PLAIN``, ``plain_xla``), the
Transformer baseline that pays for no decay.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.forgetting_attention import common, pruning
from pallas_kernels.forgetting_attention.common import BlockSizes


def default_block_sizes(head_dim: int) -> BlockSizes:
  """Tiles for XLA on a CPU, the place this implementation is the default.

  Measured on 2 CPU cores (JAX 0.11.2, B=1, H=4, causal, forward+backward): at T=4096, D=64,
  128x128 took 564 ms (float32) / 373 ms (bfloat16), 256x256 429 / 307 ms, 512x256
  354 / 215 ms, 512x512 374 / 253 ms; at T=2048, D=128 (float32) 181, 218, 164, 191 ms.
  Larger tiles amortise the per-tile loop overhead; past 512x256 the causally masked half of
  the diagonal tiles costs more than it saves. One size serves every head dim.
  """
  del head_dim
  return BlockSizes(block_q=512, block_k=256)


class _QBlocks(NamedTuple):
  """Query-side inputs split into blocks of ``bq`` rows on a leading axis."""

  q: jax.Array  # [nq, B, Hkv, G, bq, D]
  c_hi: Optional[jax.Array]  # [nq, B, Hkv, G, bq], None without a gate
  c_lo: Optional[jax.Array]  # [nq, B, Hkv, G, bq]
  seg: Optional[jax.Array]  # [nq, B, bq]
  pos: jax.Array  # [nq, bq] global positions, -1 on padding


class _KBlocks(NamedTuple):
  """Key-side inputs split into blocks of ``bk`` columns on a leading axis."""

  k: jax.Array  # [nk, B, Hkv, bk, D]
  v: jax.Array  # [nk, B, Hkv, bk, D]
  c_hi: Optional[jax.Array]  # [nk, B, Hkv, G, bk], None without a gate
  c_lo: Optional[jax.Array]  # [nk, B, Hkv, G, bk]
  seg: Optional[jax.Array]  # [nk, B, bk]
  pos: jax.Array  # [nk, bk] global positions, the largest int32 on padding


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _block_size(block: int, n: int) -> int:
  """``block``, or the smallest power of two >= n when n fits in one block.

  A sequence shorter than the block keeps exactly one block either way, so the tile ranges
  and the tile counts are unchanged; only the padding (e.g. 127 rows for T = 1) is saved.
  """
  return block if n > block else 1 << max(n - 1, 0).bit_length()


def _pad_axis1(x: jax.Array, n: int, value=0) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, n - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def _to_blocks(x: jax.Array, block: int, Hkv: int) -> jax.Array:
  """[B, N, H, ...] -> [n, B, Hkv, G, block, ...], zero-padded to n * block rows."""
  B, N, H = x.shape[:3]
  n = _cdiv(N, block)
  x = _pad_axis1(x, n * block).reshape(B, n, block, Hkv, H // Hkv, *x.shape[3:])
  return jnp.moveaxis(x, (1, 2), (0, 4))


def _from_blocks(x: jax.Array, N: int) -> jax.Array:
  """[n, B, Hkv, G, block, ...] -> [B, N, Hkv * G, ...] (padding dropped)."""
  n, B, Hkv, G, block = x.shape[:5]
  x = jnp.moveaxis(x, (0, 4), (1, 2))  # [B, n, block, Hkv, G, ...]
  return x.reshape(B, n * block, Hkv * G, *x.shape[5:])[:, :N]


def _c_blocks(c: Optional[jax.Array], block: int, Hkv: int) -> Optional[jax.Array]:
  """[B, N, Hq] -> [n, B, Hkv, G, block]; None (no gate) stays None."""
  return None if c is None else _to_blocks(c, block, Hkv)


def _at(x: Optional[jax.Array], i) -> Optional[jax.Array]:
  """Block ``i`` of a blocked input (leading axis); None (no gate, no segments) stays None."""
  return None if x is None else lax.dynamic_index_in_dim(x, i, keepdims=False)


def _seg_blocks(seg: Optional[jax.Array], block: int) -> Optional[jax.Array]:
  """[B, N] -> [n, B, block]; the padding value never matters (its positions are masked)."""
  if seg is None:
    return None
  B, N = seg.shape
  n = _cdiv(N, block)
  return jnp.moveaxis(_pad_axis1(seg, n * block).reshape(B, n, block), 1, 0)


def _pos_blocks(pos: jax.Array, block: int, pad) -> jax.Array:
  """[N] -> [n, block], padded with ``pad``."""
  n = _cdiv(pos.shape[0], block)
  return jnp.pad(pos.astype(jnp.int32), (0, n * block - pos.shape[0]),
                 constant_values=pad).reshape(n, block)


def _q_blocks(rows: common.Rows, bq: int, Hkv: int) -> _QBlocks:
  return _QBlocks(_to_blocks(rows.q, bq, Hkv), _c_blocks(rows.c_hi, bq, Hkv),
                  _c_blocks(rows.c_lo, bq, Hkv), _seg_blocks(rows.seg, bq),
                  _pos_blocks(rows.pos, bq, -1))


def _k_blocks(cols: common.Cols, bk: int, Hkv: int) -> _KBlocks:
  B, S, _, D = cols.k.shape
  nk = _cdiv(S, bk)

  def split(x):  # [B, S, Hkv, D] -> [nk, B, Hkv, bk, D]
    return jnp.moveaxis(_pad_axis1(x, nk * bk).reshape(B, nk, bk, Hkv, D), (1, 2), (0, 3))

  return _KBlocks(split(cols.k), split(cols.v), _c_blocks(cols.c_hi, bk, Hkv),
                  _c_blocks(cols.c_lo, bk, Hkv), _seg_blocks(cols.seg, bk),
                  _pos_blocks(cols.pos, bk, np.iinfo(np.int32).max))


def _heads(x: jax.Array, Hkv: int) -> jax.Array:
  """[B, Hq, n] -> [n, B, Hkv, G]."""
  B, Hq, n = x.shape
  return jnp.moveaxis(x.reshape(B, Hkv, Hq // Hkv, n), 3, 0)


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum accumulating in float32 (full float32 precision for float32 operands)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)


def _tile(q, k, cq_hi, cq_lo, ck_hi, ck_lo, seg_q, seg_k, pos_q, pos_k, delta, tile_ok, scale):
  """Biased logits of one tile and its mask, both [B, Hkv, G, bq, bk].

  delta: [B, Hkv, G] or None; tile_ok: [B, Hkv, G] whether each head keeps this tile.
  Without a gate (c None, delta None) the logits are the scaled dot products alone.
  """
  s = scale * _dot("bhgqd,bhkd->bhgqk", q, k)
  mask = (pos_q[:, None] >= pos_k[None, :]) & tile_ok[..., None, None]
  if seg_q is not None:
    mask = mask & (seg_q[:, :, None] == seg_k[:, None, :])[:, None, None]
  if cq_hi is None:
    return s, mask
  # D_ij from the double-float pair: the hi difference is exact for nearby tokens.
  decay = (cq_hi[..., :, None] - ck_hi[..., None, :]) + (cq_lo[..., :, None] - ck_lo[..., None, :])
  if delta is not None:
    mask = mask & ~(decay < delta[..., None, None])  # a NaN decay is kept, not dropped
  return s + decay, mask


def _setup(rows: common.Rows, cols: common.Cols, delta, block_q, block_k):
  B, T, Hq, _ = rows.q.shape
  S, Hkv = cols.k.shape[1], cols.k.shape[2]
  bq, bk = _block_size(block_q, T), _block_size(block_k, S)
  c = (rows.c_hi, rows.c_lo, cols.c_hi, cols.c_lo)
  if rows.c_hi is None:
    # No gate (and no threshold): the ranges come from the causal order and the segments
    # alone, and read c for its [B, N, Hq] shape only.
    zq, zk = jnp.zeros((B, T, Hq), jnp.float32), jnp.zeros((B, S, Hq), jnp.float32)
    c = (zq, zq, zk, zk)
  ranges = pruning.chunk_tile_ranges(*c, rows.seg, cols.seg, rows.pos, cols.pos, bq, bk, delta)
  delta_h = None if delta is None else delta.reshape(B, Hkv, Hq // Hkv)
  return bq, bk, ranges, delta_h


def forward(q, k, v, c_hi, c_lo, segment_ids, delta, *, sm_scale: float, block_sizes: BlockSizes,
            interpret: bool = False):
  """o [B, T, Hq, D] (q.dtype), lse [B, Hq, T] f32, kept_tiles [B, Hq] i32 and the lse
  again, which is what ``backward`` reads; see ``api``."""
  del interpret  # plain XLA: nothing to interpret
  rows, cols = common.whole_sequence(q, k, v, c_hi, c_lo, segment_ids)
  o, lse, kept = forward_chunk(rows, cols, delta, sm_scale=sm_scale, block_sizes=block_sizes)
  return o.astype(q.dtype), lse, kept, lse


def forward_chunk(rows: common.Rows, cols: common.Cols, delta, *, sm_scale: float,
                  block_sizes: BlockSizes, interpret: bool = False):
  """The queries of ``rows`` against the keys of ``cols`` alone: o [B, T, Hq, D] float32,
  normalised over these keys, their lse [B, Hq, T] (-inf where a query sees none of them,
  o = 0 there) and the kept tiles [B, Hq] int32. Partial results of chunks merge by lse.

  The chunk contract every implementation with chunk kernels follows (``registry``): this,
  ``row_terms_chunk`` and ``backward_chunk``, at any global positions of the two chunks.
  """
  del interpret  # plain XLA
  q, v = rows.q, cols.v
  B, T, Hq, D = q.shape
  Hkv = cols.k.shape[2]
  bq, bk, ranges, delta_h = _setup(rows, cols, delta, block_sizes.block_q, block_sizes.block_k)
  qs = _q_blocks(rows, bq, Hkv)
  ks = _k_blocks(cols, bk, Hkv)
  kv_start, kv_end = _heads(ranges.kv_start, Hkv), _heads(ranges.kv_end, Hkv)  # [nq, B, Hkv, G]
  # Kv blocks of each q block's loop: the union of every head's kept range.
  lo, hi = kv_start.min(axis=(1, 2, 3)), kv_end.max(axis=(1, 2, 3))  # [nq]
  seg_k = ks.seg

  def q_block(_, xs):
    qi, cq_hi, cq_lo, seg_q, pos_q, lo_i, hi_i, start, end = xs

    def kv_step(j, carry):
      m, l, acc = carry
      at = lambda x: _at(x, j)
      s, mask = _tile(qi, at(ks.k), cq_hi, cq_lo, at(ks.c_hi), at(ks.c_lo), seg_q,
                      at(seg_k), pos_q, at(ks.pos), delta_h,
                      (start <= j) & (j < end), sm_scale)
      s = jnp.where(mask, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=-1))  # [B, Hkv, G, bq]
      # Rows with nothing visible yet keep m = -inf; shift them by 0 so exp gives exact zeros.
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + p.sum(axis=-1)
      acc = alpha[..., None] * acc + _dot("bhgqk,bhkd->bhgqd", p.astype(v.dtype), at(ks.v))
      return m_new, l, acc

    G = Hq // Hkv
    init = (jnp.full((B, Hkv, G, bq), -jnp.inf, jnp.float32),
            jnp.zeros((B, Hkv, G, bq), jnp.float32),
            jnp.zeros((B, Hkv, G, bq, D), jnp.float32))
    m, l, acc = lax.fori_loop(lo_i, hi_i, kv_step, init)
    # Rows that see no key get o = 0, lse = -inf; a NaN l (NaN input) stays NaN in both.
    l_safe = jnp.where(l == 0, 1.0, l)
    o = acc / l_safe[..., None]
    lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(l_safe))
    return None, (o, lse)

  xs = (qs.q, qs.c_hi, qs.c_lo, qs.seg, qs.pos, lo, hi, kv_start, kv_end)
  _, (o, lse) = lax.scan(q_block, None, xs)
  o = _from_blocks(o, T)  # [B, T, Hq, D]
  lse = _from_blocks(lse, T).transpose(0, 2, 1)  # [B, Hq, T]
  return o, lse, ranges.kept_tiles()


def _row_terms(qs, ks, dos, lse_b, dd_b, lo, hi, kv_start, kv_end, delta_h, sm_scale):
  """g_i = sum_{j != i} P_ij (dP_ij - dP_ii) and r_i = sum_{j != i} P_ij, each
  [nq, B, Hkv, G, bq], from one pass over the kept tiles.

  dP_ii = do_i . v_i is the query's own key; the exact term j = i (zero) is left out.
  """

  def q_block(_, xs):
    qi, doi, lse_i, dd_i, cq_hi, cq_lo, seg_q, pos_q, lo_i, hi_i, start, end = xs

    def kv_step(j, carry):
      g, r = carry
      at = lambda x: _at(x, j)
      pos_k = at(ks.pos)
      s, mask = _tile(qi, at(ks.k), cq_hi, cq_lo, at(ks.c_hi), at(ks.c_lo), seg_q,
                      at(ks.seg), pos_q, pos_k, delta_h,
                      (start <= j) & (j < end), sm_scale)
      p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
      dp = _dot("bhgqd,bhkd->bhgqk", doi, at(ks.v))
      diag = pos_q[:, None] == pos_k[None, :]
      off_diag = jnp.where(diag, 0.0, dp - dd_i[..., None])
      return g + jnp.sum(p * off_diag, axis=-1), r + jnp.sum(jnp.where(diag, 0.0, p), axis=-1)

    zeros = jnp.zeros(lse_i.shape, jnp.float32)
    return None, lax.fori_loop(lo_i, hi_i, kv_step, (zeros, zeros))

  xs = (qs.q, dos, lse_b, dd_b, qs.c_hi, qs.c_lo, qs.seg, qs.pos, lo, hi, kv_start, kv_end)
  return lax.scan(q_block, None, xs)[1]


def _bwd_setup(rows, cols, do, lse, dd, delta, block_sizes):
  """Blocked inputs of both backward passes, at the backward tiles."""
  Hkv = cols.k.shape[2]
  bq, bk, ranges, delta_h = _setup(rows, cols, delta, *block_sizes.bwd)
  qs = _q_blocks(rows, bq, Hkv)
  ks = _k_blocks(cols, bk, Hkv)
  dos = _to_blocks(do, bq, Hkv)  # [nq, B, Hkv, G, bq, D]
  # Padded rows get lse = 0; their mask is empty so the value never matters.
  lse_b = _to_blocks(lse.transpose(0, 2, 1), bq, Hkv)  # [nq, B, Hkv, G, bq]
  dd_b = None if dd is None else _to_blocks(dd.transpose(0, 2, 1), bq, Hkv)  # [nq, B, Hkv, G, bq]
  return bq, bk, ranges, delta_h, qs, ks, dos, lse_b, dd_b


def row_terms_chunk(rows: common.Rows, cols: common.Cols, do, lse, dd, delta, *,
                    sm_scale: float, block_sizes: BlockSizes, interpret: bool = False):
  """The row terms of the anchored dS over the keys of ``cols``: g_i = sum_{j != i} P_ij
  (dP_ij - dd_i) and r_i = sum_{j != i} P_ij, each [B, Hq, T] float32; over chunks they add.

  lse [B, Hq, T]: the queries' log-sum-exp over every key (the global one); dd [B, Hq, T]:
  do_i . v_i at the query's own key (``common.own_key_dot``). The own key (equal positions)
  is left out: its term is zero exactly.
  """
  del interpret
  T, Hkv = rows.q.shape[1], cols.k.shape[2]
  _, _, ranges, delta_h, qs, ks, dos, lse_b, dd_b = _bwd_setup(rows, cols, do, lse, dd, delta,
                                                              block_sizes)
  kv_start, kv_end = _heads(ranges.kv_start, Hkv), _heads(ranges.kv_end, Hkv)  # [nq, B, Hkv, G]
  g, r = _row_terms(qs, ks, dos, lse_b, dd_b, kv_start.min(axis=(1, 2, 3)),
                    kv_end.max(axis=(1, 2, 3)), kv_start, kv_end, delta_h, sm_scale)
  return _from_blocks(g, T).transpose(0, 2, 1), _from_blocks(r, T).transpose(0, 2, 1)


def backward_chunk(rows: common.Rows, cols: common.Cols, do, lse, dd, g_b, delta, *,
                   sm_scale: float, block_sizes: BlockSizes, interpret: bool = False):
  """The gradients from the pairs of ``rows`` x ``cols``, float32: dq [B, T, Hq, D], dk, dv
  [B, S, Hkv, D] and the column part of dc, -sum_{i != j} dS_ij, [B, S, Hq].

  g_b [B, Hq, T] = g - dlse with g summed over every key (``row_terms_chunk``); with it
  dS_ij = P_ij ((dP_ij - dd_i) - g_b_i). The row part of dc, sum_{j != i} dS_ij = g - g_b r,
  is the caller's, from the row terms' totals.

  Without a gate (c None), ``dd`` is None and g_b is Delta = dO . o - dlse: the textbook
  dS_ij = P_ij (dP_ij - Delta_i), not anchored, and dc is None.
  """
  del interpret
  q, k, v = rows.q, cols.k, cols.v
  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  G = Hq // Hkv
  bq, bk, ranges, delta_h, qs, ks, dos, lse_b, dd_b = _bwd_setup(rows, cols, do, lse, dd, delta,
                                                                block_sizes)
  nq = _cdiv(T, bq)
  g_b = _to_blocks(g_b.transpose(0, 2, 1), bq, Hkv)  # [nq, B, Hkv, G, bq]
  q_start, q_end = _heads(ranges.q_start, Hkv), _heads(ranges.q_end, Hkv)  # [nk, B, Hkv, G]
  lo, hi = q_start.min(axis=(1, 2, 3)), q_end.max(axis=(1, 2, 3))  # [nk]
  seg_q = qs.seg

  def kv_block(dq, xs):
    kj, vj, ck_hi, ck_lo, seg_k, pos_k, lo_j, hi_j, start, end = xs

    def q_step(i, carry):
      dq, dk, dv, dc = carry
      at = lambda x: _at(x, i)
      qi, doi, lse_i, dd_i, g_i, pos_q = at(qs.q), at(dos), at(lse_b), at(dd_b), at(g_b), at(qs.pos)
      s, mask = _tile(qi, kj, at(qs.c_hi), at(qs.c_lo), ck_hi, ck_lo, at(seg_q), seg_k, pos_q,
                      pos_k, delta_h, (start <= i) & (i < end), sm_scale)
      p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)  # [B, Hkv, G, bq, bk]
      dp = _dot("bhgqd,bhkd->bhgqk", doi, vj)
      if dd_i is None:  # no gate: dS = P (dP - Delta)
        ds = p * (dp - g_i[..., None])
      else:
        diag = pos_q[:, None] == pos_k[None, :]
        off_diag = jnp.where(diag, 0.0, dp - dd_i[..., None])
        ds = p * (off_diag - g_i[..., None])
        dc = dc - jnp.where(diag, 0.0, ds).sum(axis=-2)
      dv = dv + _dot("bhgqk,bhgqd->bhkd", p.astype(v.dtype), doi)
      dk = dk + _dot("bhgqk,bhgqd->bhkd", ds.astype(q.dtype), qi)
      dq_i = at(dq) + _dot("bhgqk,bhkd->bhgqd", ds.astype(k.dtype), kj)
      dq = lax.dynamic_update_index_in_dim(dq, dq_i, i, axis=0)
      return dq, dk, dv, dc

    dc0 = None if dd_b is None else jnp.zeros((B, Hkv, G, bk), jnp.float32)
    init = (dq, jnp.zeros((B, Hkv, bk, D), jnp.float32), jnp.zeros((B, Hkv, bk, D), jnp.float32),
            dc0)
    dq, dk, dv, dc = lax.fori_loop(lo_j, hi_j, q_step, init)
    return dq, (sm_scale * dk, dv, dc)

  xs = (ks.k, ks.v, ks.c_hi, ks.c_lo, ks.seg, ks.pos, lo, hi, q_start, q_end)
  dq0 = jnp.zeros((nq, B, Hkv, G, bq, D), jnp.float32)
  dq, (dk, dv, dc) = lax.scan(kv_block, dq0, xs)
  dq = sm_scale * _from_blocks(dq, T)  # [B, T, Hq, D]
  # [nk, B, Hkv, bk, D] -> [B, S, Hkv, D]
  dk = jnp.moveaxis(dk, (0, 3), (1, 2)).reshape(B, -1, Hkv, D)[:, :S]
  dv = jnp.moveaxis(dv, (0, 3), (1, 2)).reshape(B, -1, Hkv, D)[:, :S]
  return dq, dk, dv, None if dc is None else _from_blocks(dc, S)


def backward(q, k, v, c_hi, c_lo, segment_ids, delta, o, lse, do, dlse, *, sm_scale: float,
             block_sizes: BlockSizes, interpret: bool = False):
  """dq, dk, dv (input dtypes) and dc [B, S, Hq] f32 = row sums minus column sums of dS.

  The textbook dS = P (dP - di) with di = rowsum(o * do) - dlse is not used: under strong
  forgetting P_ii ~ 1, o_i ~ v_i and dP_ij - di_i cancels to a tiny number, so the output's
  rounding (2^-9 relative in bfloat16, 2^-24 in float32) would swamp dS on the diagonal.
  Instead dS is anchored at the query's own key,

      dS_ij = P_ij ((dP_ij - dP_ii) - (g_i - dlse_i)),   g_i = sum_{j != i} P_ij (dP_ij - dP_ii),

  with dP_ii - dP_ii = 0 exactly, so every term keeps its relative precision. For the same
  reason dc_t sums dS without its diagonal, which the row and the column sum share:
  dc_t = sum_{j != t} dS_tj - sum_{i != t} dS_it, the row part being g_t - (g_t - dlse_t) r_t
  (a plain dlse_t - dS_tt would cancel when P_tt ~ 1). g and r come from one extra pass
  over the kept tiles (two matmuls per tile, ``row_terms_chunk``); then one pass over key
  blocks and, inside, the query blocks that see them (the mirrored kept ranges) recomputes P
  from lse and forms dV += P^T dO, dK += dS^T Q, dQ += dS K (``backward_chunk``; dQ
  accumulated in a float32 buffer).
  """
  del interpret, o  # g is summed exactly in its own pass: no estimate from o needed
  T, S = q.shape[1], k.shape[1]
  rows, cols = common.whole_sequence(q, k, v, c_hi, c_lo, segment_ids)
  dd = common.own_key_dot(do, v)  # [B, Hq, T]: dP_ii = do_i . v_i at each query's own key
  kw = dict(sm_scale=sm_scale, block_sizes=block_sizes)
  g, r = row_terms_chunk(rows, cols, do, lse, dd, delta, **kw)
  g_b = g - dlse.astype(jnp.float32)
  dq, dk, dv, dc = backward_chunk(rows, cols, do, lse, dd, g_b, delta, **kw)
  row_sums = (g - g_b * r).transpose(0, 2, 1)  # [B, T, Hq]: sum_{j != i} dS_ij
  dc = dc.at[:, S - T:].add(row_sums)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dc


# ----------------------------------------------------------------------------- no gate


def plain_forward(q, k, v, segment_ids, *, sm_scale: float, block_sizes: BlockSizes):
  """Causal softmax attention without a gate (log f = 0): o [B, T, Hq, D] (q.dtype) and lse
  [B, Hq, T] f32, the queries being the last T of the S keys; no decay is loaded or added."""
  rows, cols = common.whole_sequence(q, k, v, None, None, segment_ids)
  o, lse, _ = forward_chunk(rows, cols, None, sm_scale=sm_scale, block_sizes=block_sizes)
  return o.astype(q.dtype), lse


def plain_backward(q, k, v, segment_ids, o, lse, do, *, sm_scale: float,
                   block_sizes: BlockSizes):
  """dq, dk, dv (input dtypes) of :func:`plain_forward`: the flash backward, one pass over
  key blocks (the mirrored causal/segment ranges) with dS = P (dP - Delta), Delta_i =
  dO_i . o_i from the output ``o`` the forward returned."""
  rows, cols = common.whole_sequence(q, k, v, None, None, segment_ids)
  delta = jnp.einsum("bthd,bthd->bht", o, do, preferred_element_type=jnp.float32,
                     precision=lax.Precision.HIGHEST)  # [B, Hq, T]
  dq, dk, dv, _ = backward_chunk(rows, cols, do, lse, None, delta, None, sm_scale=sm_scale,
                                 block_sizes=block_sizes)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

"""Tile skipping: causal structure, segment boundaries and Adaptive Computation Pruning (ACP).

All three reasons to skip a (q block, kv block) tile go through one mechanism,
:func:`tile_ranges`, so every implementation skips exactly the same tiles.

ACP (arXiv 2504.06949): drop every (i, j) with D_ij < delta, where

    delta = log_eps - 2 U - log(S),    U >= max_ij |scale * q_i . k_j|.

The softmax denominator of query i is at least exp(s_ii) >= exp(-U) (D_ii = 0); each pruned
numerator is at most exp(U + delta) and there are at most S of them, so the pruned weights
of every query sum to at most eps and |o_pruned - o| <= 2 eps max|v| row-wise.

Because c is non-increasing, the largest D inside a tile is at its corner (first query
row, last key column), so a tile whose corner is below delta holds only prunable pairs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.forgetting_attention.common import bound_margin, finite_number, row_norms


def _norm_weight(x, name: str):
  """An RMSNorm weight as an array of real numbers, shape [D] or [H, D], or a ValueError.

  JAX (also traced) and numpy arrays are kept as they are; other array-likes (lists) become
  float32 numpy arrays.
  """
  if isinstance(x, (str, bytes)):
    raise ValueError(f"{name} must be a float array of shape [D] or [H, D], got {x!r}")
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    try:
      x = np.asarray(x)
    except (TypeError, ValueError):
      raise ValueError(f"{name} must be a float array of shape [D] or [H, D], got "
                       f"{type(x).__name__}") from None
    if x.dtype.kind in "iuf":
      x = x.astype(np.float32)
  dtype = np.dtype(x.dtype)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f"{name} must be a float array of shape [D] or [H, D], got dtype {dtype}")
  if len(x.shape) not in (1, 2) or 0 in x.shape:
    raise ValueError(f"{name} must be a float array of shape [D] or [H, D], got shape "
                     f"{tuple(x.shape)}")
  return x


@dataclasses.dataclass(frozen=True)
class QKNormBound:
  """U from QK-norm scales: per-head RMSNorm gives |q_i| <= sqrt(d) max|gamma_q|.

  q_scale, k_scale: the RMSNorm weights, shape [D] (shared across heads) or [H, D]
  (per head; k_scale's H is the number of kv heads), arrays or array-likes of real numbers.
  The shapes are checked here; D and H against q and k when the op uses the bound.
  """

  q_scale: jax.Array
  k_scale: jax.Array

  def __post_init__(self):
    for name in ("q_scale", "k_scale"):
      object.__setattr__(self, name, _norm_weight(getattr(self, name), f"QKNormBound.{name}"))

  def check(self, num_q_heads: int, num_kv_heads: int, head_dim: int):
    """ValueError unless the weights fit q with these heads and head dim (and k's heads)."""
    for name, heads in (("q_scale", num_q_heads), ("k_scale", num_kv_heads)):
      shape = tuple(getattr(self, name).shape)
      want = ((head_dim,), (heads, head_dim))
      if shape not in want:
        raise ValueError(f"pruning.qk_bound.{name} must have shape {want[0]} or {want[1]} "
                         f"for {heads} heads of dim {head_dim}, got {shape}")


@dataclasses.dataclass(frozen=True)
class Pruning:
  """ACP settings. ``log_tolerance`` is log(eps): the pruned weights of each query sum to
  at most exp(log_tolerance). ``qk_bound`` is "auto" (U from the inputs' norms), a
  :class:`QKNormBound`, or a float U that the caller guarantees."""

  log_tolerance: float = -10.0
  qk_bound: Union[str, float, QKNormBound] = "auto"

  def __post_init__(self):
    # Numbers are stored as Python floats (numpy and JAX scalars are accepted).
    tol = finite_number(self.log_tolerance, "pruning.log_tolerance")
    if not tol < 0:
      raise ValueError(f"pruning.log_tolerance must be a negative float, got {self.log_tolerance!r}")
    object.__setattr__(self, "log_tolerance", tol)
    b = self.qk_bound
    if isinstance(b, str):
      if b != "auto":
        raise ValueError(f"pruning.qk_bound must be 'auto', a float or a QKNormBound, got {b!r}")
    elif not isinstance(b, QKNormBound):
      u = finite_number(b, "pruning.qk_bound")
      if not u >= 0:
        raise ValueError(f"pruning.qk_bound must be >= 0, got {b!r}")
      object.__setattr__(self, "qk_bound", u)


def _pmax(x: jax.Array, axis_name) -> jax.Array:
  """``x``, or its maximum over the devices of ``axis_name`` (inside ``shard_map``)."""
  return x if axis_name is None else jax.lax.pmax(jax.lax.stop_gradient(x), axis_name)


def qk_bound(q: jax.Array, k: jax.Array, pruning: Pruning, sm_scale: float,
             axis_name=None) -> jax.Array:
  """U per batch x q head, [B, Hq] float32, with no gradient through it.

  With ``axis_name``, q and k are this device's part of a sequence sharded over that mesh
  axis and U is the bound over the whole sequence (every device gets the same U).

  The computed bounds carry a small relative margin so that they stay bounds in floating
  point: float32 rounding of the norms and of the kernels' length-D dot products
  (``common.bound_margin``), and for QK-norm also the rounding of the normalised q and k to
  their dtype (each element within a relative eps of its exact value). The "auto" norms
  neither overflow nor underflow for finite rows (``common.row_norms``); a bound that
  overflows float32 is inf (or NaN for 0 * inf), and ``threshold`` then prunes nothing.
  """
  B, _, Hq, Dh = q.shape
  Hkv = k.shape[2]
  b = pruning.qk_bound
  f32_margin = bound_margin(Dh)
  if isinstance(b, str):
    qn = _pmax(jnp.max(row_norms(q), axis=1), axis_name)  # [B, Hq]
    kn = _pmax(jnp.max(row_norms(k), axis=1), axis_name)  # [B, Hkv]
    u = (abs(sm_scale) * f32_margin) * qn * jnp.repeat(kn, Hq // Hkv, axis=1)
  elif isinstance(b, QKNormBound):
    b.check(Hq, Hkv, Dh)
    gq = jnp.max(jnp.abs(b.q_scale.astype(jnp.float32)), axis=-1)
    gk = jnp.max(jnp.abs(b.k_scale.astype(jnp.float32)), axis=-1)
    gq = jnp.broadcast_to(gq, (Hq,)) if gq.ndim == 0 else gq
    gk = jnp.broadcast_to(gk, (Hkv,)) if gk.ndim == 0 else gk
    dtype_margin = (1.0 + float(jnp.finfo(q.dtype).eps)) ** 2
    u = (abs(sm_scale) * Dh * f32_margin * dtype_margin) * gq * jnp.repeat(gk, Hq // Hkv)
    u = jnp.broadcast_to(u, (B, Hq))
  else:
    u = jnp.full((B, Hq), float(b), jnp.float32)
  return jax.lax.stop_gradient(u)


def finite_heads(q: jax.Array, k: jax.Array, axis_name=None) -> jax.Array:
  """[B, Hq] bool: every element of the head's q and of its kv head's k is finite (over the
  whole sequence when it is sharded over ``axis_name``)."""
  Hq, Hkv = q.shape[2], k.shape[2]
  qf = jnp.all(jnp.isfinite(q), axis=(1, 3))  # [B, Hq]
  kf = jnp.all(jnp.isfinite(k), axis=(1, 3))  # [B, Hkv]
  ok = qf & jnp.repeat(kf, Hq // Hkv, axis=1)
  if axis_name is None:
    return ok
  return jax.lax.pmin(jax.lax.stop_gradient(ok.astype(jnp.int32)), axis_name) > 0


def threshold(q: jax.Array, k: jax.Array, pruning: Pruning, sm_scale: float, *,
              num_keys: Optional[int] = None, axis_name=None) -> jax.Array:
  """delta = log_eps - 2U - log(S), [B, Hq] float32; -inf (prune nothing) for a head whose
  q or k holds a NaN or an infinity.

  For a sequence sharded over the mesh axis ``axis_name`` (inside ``shard_map``), q and k
  are this device's part, ``num_keys`` is the whole sequence's S, and U and the finiteness
  are reduced over the axis, so every device prunes exactly what the single-device op
  prunes.

  A non-finite input breaks every bound (a NaN "auto" bound would give a NaN delta, and a
  NaN compare drops the pair, so the whole head would come out as silent zeros). With
  pruning off for that head, the NaN reaches exactly the outputs it reaches without
  pruning, for every kind of bound.
  """
  S = k.shape[1] if num_keys is None else num_keys
  u = qk_bound(q, k, pruning, sm_scale, axis_name)
  delta = (pruning.log_tolerance - 2.0 * u - math.log(S)).astype(jnp.float32)
  ok = jax.lax.stop_gradient(finite_heads(q, k, axis_name)) & jnp.isfinite(delta)
  return jnp.where(ok, delta, -jnp.inf)


class TileRanges(NamedTuple):
  """Kept tiles as ranges; every array is int32.

  kv_start, kv_end: [B, H, nq]  kv blocks [kv_start, kv_end) for each q block (forward, dQ)
  q_start, q_end:   [B, H, nk]  q blocks [q_start, q_end) for each kv block (dK/dV)
  Tiles inside a range may still be partly masked element-wise (causal diagonal, segments).
  An empty range has start >= end.
  """

  kv_start: jax.Array
  kv_end: jax.Array
  q_start: jax.Array
  q_end: jax.Array

  def kept_tiles(self) -> jax.Array:
    """[B, H] number of tiles the forward (and dQ) pass computes."""
    return jnp.sum(jnp.maximum(self.kv_end - self.kv_start, 0), axis=-1)


def _block_min_max(x: jax.Array, block: int, fill) -> tuple[jax.Array, jax.Array]:
  """Per-block min and max along the last axis of [..., N] (N padded with ``fill``)."""
  n = x.shape[-1]
  nb = -(-n // block)
  lo = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)], constant_values=fill[0])
  hi = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * block - n)], constant_values=fill[1])
  lo = lo.reshape(*x.shape[:-1], nb, block).min(-1)
  hi = hi.reshape(*x.shape[:-1], nb, block).max(-1)
  return lo, hi


def tile_ranges(
    c_hi: jax.Array,
    c_lo: jax.Array,
    segment_ids: Optional[jax.Array],
    num_queries: int,
    block_q: int,
    block_k: int,
    delta: Optional[jax.Array] = None,
) -> TileRanges:
  """Kept-tile ranges of the single-device op, whose queries are the last ``num_queries``
  of the S keys: :func:`chunk_tile_ranges` with the query side sliced from the key side.

  c_hi, c_lo: [B, S, H] the cumulative log forget gate as a double-float pair.
  segment_ids: [B, S] or None. delta: [B, H] ACP threshold, or None for no pruning.
  """
  S = c_hi.shape[1]
  off = S - num_queries
  seg_q = None if segment_ids is None else segment_ids[:, off:]
  return chunk_tile_ranges(c_hi[:, off:], c_lo[:, off:], c_hi, c_lo, seg_q, segment_ids,
                           off + jnp.arange(num_queries, dtype=jnp.int32),
                           jnp.arange(S, dtype=jnp.int32), block_q, block_k, delta)


def _block_ends(pos: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """Indices of the first and last element of each block of ``block`` along [N]."""
  n = pos.shape[0]
  a = np.arange(-(-n // block))
  return a * block, np.minimum((a + 1) * block, n) - 1


def chunk_tile_ranges(
    cq_hi: jax.Array,
    cq_lo: jax.Array,
    ck_hi: jax.Array,
    ck_lo: jax.Array,
    seg_q: Optional[jax.Array],
    seg_k: Optional[jax.Array],
    q_pos: jax.Array,
    k_pos: jax.Array,
    block_q: int,
    block_k: int,
    delta: Optional[jax.Array] = None,
) -> TileRanges:
  """Kept-tile ranges of a chunk of T queries against a chunk of S keys anywhere in the
  sequence, from the causal order, segment boundaries and the ACP threshold.

  cq_hi, cq_lo: [B, T, H] and ck_hi, ck_lo: [B, S, H] the global cumulative log forget gate
  at the queries and at the keys (double-float pairs). seg_q [B, T], seg_k [B, S]: segment
  ids, or both None. q_pos [T], k_pos [S]: the tokens' global positions, strictly
  increasing within each chunk (any layout of a sequence over devices keeps each device's
  tokens in order), possibly traced. delta: [B, H] ACP threshold, or None.

  A tile is kept when (1) its first key is at or before its last query, (2) the segment-id
  ranges of its queries and keys overlap, and (3) its corner decay D(first query, last key)
  = cq[first query] - ck[last key] is >= delta. Because c does not increase along the
  sequence and positions increase within a chunk, that corner is the tile's largest decay
  over causally visible pairs whenever the last key is before the first query; otherwise
  the tile may hold pairs with D close to 0 and is kept. The predicate is a broadcast of
  per-block vectors that XLA fuses into the four reductions below.
  """
  B, T, H = cq_hi.shape
  S = ck_hi.shape[1]
  nq = -(-T // block_q)
  nk = -(-S // block_k)
  qa, qz = _block_ends(q_pos, block_q)
  ka, kz = _block_ends(k_pos, block_k)
  q_first, q_last = q_pos[qa], q_pos[qz]  # [nq] global positions
  k_first, k_last = k_pos[ka], k_pos[kz]  # [nk]

  causal = k_first[None, :] <= q_last[:, None]  # [nq, nk]
  kept = jnp.broadcast_to(causal, (B, H, nq, nk))
  if delta is not None:
    hq, lq = cq_hi.transpose(0, 2, 1), cq_lo.transpose(0, 2, 1)  # [B, H, T]
    hk, lk = ck_hi.transpose(0, 2, 1), ck_lo.transpose(0, 2, 1)  # [B, H, S]
    corner = (hq[:, :, qa][..., None] - hk[:, :, kz][:, :, None, :]) + (
        lq[:, :, qa][..., None] - lk[:, :, kz][:, :, None, :])  # [B, H, nq, nk]
    # A tile whose last key is not before its first query holds pairs near the diagonal
    # (D_ii = 0 >= delta): always kept.
    corner = jnp.where(k_last[None, :] >= q_first[:, None], 0.0, corner)
    # "not below" rather than ">=": a NaN corner (NaN gate) or a NaN delta keeps the tile.
    kept = kept & ~(corner < delta[:, :, None, None])
  if seg_q is not None:
    info = jnp.iinfo(jnp.int32)
    kmin, kmax = _block_min_max(seg_k.astype(jnp.int32), block_k, (info.max, info.min))  # [B, nk]
    qmin, qmax = _block_min_max(seg_q.astype(jnp.int32), block_q, (info.max, info.min))  # [B, nq]
    overlap = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
    kept = kept & overlap[:, None]

  bb = jnp.arange(nk, dtype=jnp.int32)
  aa = jnp.arange(nq, dtype=jnp.int32)
  kv_start = jnp.min(jnp.where(kept, bb, nk), axis=-1).astype(jnp.int32)
  kv_end = jnp.max(jnp.where(kept, bb + 1, 0), axis=-1).astype(jnp.int32)
  q_start = jnp.min(jnp.where(kept, aa[:, None], nq), axis=-2).astype(jnp.int32)
  q_end = jnp.max(jnp.where(kept, aa[:, None] + 1, 0), axis=-2).astype(jnp.int32)
  return TileRanges(kv_start, kv_end, q_start, q_end)


def causal_tiles(num_queries: int, num_keys: int, block_q: int, block_k: int) -> int:
  """Tiles the plain causal kernel computes (no segments, no pruning)."""
  T, S = num_queries, num_keys
  total = 0
  for a in range(-(-T // block_q)):
    q_last = S - T + min((a + 1) * block_q, T) - 1
    total += min(q_last // block_k + 1, -(-S // block_k))
  return total

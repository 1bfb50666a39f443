"""Naive forgetting attention: materialises the [T, S] logits. The oracle for every kernel,
and (``forward_chunk``, ``row_terms_chunk``, ``backward_chunk``, below) for their chunk kernels.

Shapes:
  q:          [B, T, Hq, D]
  k, v:       [B, S, Hkv, D]    S >= T; queries are the last T positions
  log_fgate:  [B, S, Hq]        log f_t <= 0 for every key position
  segment_ids:[B, S] int        queries use the last T entries
  returns o:  [B, T, Hq, D] in q.dtype, lse: [B, Hq, T]

Computes in float64 when x64 is enabled and any input is float64, otherwise in float32.

Zero gates. A gate f_t = 0 (log f_t = -inf) forgets everything before t: every pair (i, j)
with j < t <= i gets D_ij = -inf, weight exactly 0 (the key at t itself stays visible). So
does a finite log f_t < -(2U + 800), U = max |scale q.k| over the finite logits of the
batch x head: any pair crossing it has weight below exp(-800), zero in float64 too, and
counting it as a zero gate keeps the huge value out of the cumulative sum (where it would
cancel every later D_ij). The gradient with respect to a zero gate is 0. A NaN gate at t
makes c NaN from t on, so every query at t or later is NaN, as a plain cumulative sum gives.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.forgetting_attention import common, pruning
from pallas_kernels.forgetting_attention.common import BlockSizes

_HIGHEST = jax.lax.Precision.HIGHEST

# A finite gate this far (nats) below -2U counts as f = 0: exp(-800) is 0 in float64.
_ZERO_GATE_MARGIN = 800.0


def _compute_dtype(*xs):
  if jax.config.jax_enable_x64 and any(x.dtype == jnp.float64 for x in xs):
    return jnp.float64
  return jnp.float32


def forgetting_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_fgate: jax.Array,
    *,
    segment_ids: Optional[jax.Array] = None,
    sm_scale: Optional[float] = None,
    prune_threshold: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """Returns (o, lse). ``prune_threshold`` [B, Hq] drops every (i, j) with D_ij < it."""
  B, T, Hq, Dh = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  dt = _compute_dtype(q, k, v, log_fgate)
  scale = Dh ** -0.5 if sm_scale is None else sm_scale
  group = Hq // Hkv
  qf = q.astype(dt)
  kf = jnp.repeat(k.astype(dt), group, axis=2)  # [B, S, Hq, D]
  vf = jnp.repeat(v.astype(dt), group, axis=2)

  content = scale * jnp.einsum("bthd,bshd->bhts", qf, kf)  # [B, H, T, S]
  log_f = log_fgate.astype(dt)
  u = jax.lax.stop_gradient(
      jnp.max(jnp.where(jnp.isfinite(content), jnp.abs(content), 0.0), axis=(2, 3)))  # [B, H]
  zero = (log_f == -jnp.inf) | (log_f < -(2.0 * u + _ZERO_GATE_MARGIN)[:, None, :])  # [B, S, H]
  c = jnp.cumsum(jnp.where(zero, 0.0, log_f), axis=1).transpose(0, 2, 1)  # [B, H, S]
  n = jnp.cumsum(zero, axis=1, dtype=jnp.int32).transpose(0, 2, 1)  # zero gates at or before s
  crossed = n[:, :, S - T:, None] > n[:, :, None, :]  # [B, H, T, S]: a zero gate in (j, i]
  decay = jnp.where(crossed, -jnp.inf, c[:, :, S - T:, None] - c[:, :, None, :])
  # A NaN logit stays NaN across a zero gate (NaN + -inf): NaN input is never dropped.
  logits = content + decay

  q_pos = jnp.arange(T) + (S - T)
  mask = q_pos[:, None] >= jnp.arange(S)[None, :]  # [T, S]
  mask = jnp.broadcast_to(mask, (B, Hq, T, S))
  if segment_ids is not None:
    seg_q = segment_ids[:, S - T:]
    same = seg_q[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    mask = mask & same[:, None]
  if prune_threshold is not None:
    # Dropped only when below the threshold: a NaN decay (NaN gate) is kept and propagates.
    mask = mask & ~(decay < prune_threshold.astype(dt)[:, :, None, None])

  logits = jnp.where(mask, logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, H, T]
  p = jnp.exp(logits - lse[..., None])
  o = jnp.einsum("bhts,bshd->bthd", p, vf)
  return o.astype(q.dtype), lse


# ----------------------------------------------------------------------------- chunks
#
# The chunk contract of the blockwise implementations (``xla.forward_chunk``,
# ``row_terms_chunk``, ``backward_chunk``; ``common.Rows`` x ``common.Cols``), element-wise:
# the [B, Hq, T, S] logits of the pair are materialised. The arithmetic is in
# ``_compute_dtype`` of the inputs (float64 when x64 is on and an input is float64), and so
# are the results. The mask is the xla kernels': causal by global position, equal segment
# ids, and ACP's ``delta`` drops a pair whose decay is below it (a NaN decay is kept). The
# decay is D_ij = (c_hi_i - c_hi_j) + (c_lo_i - c_lo_j) from the given global c, whose zero
# gates the caller has floored (``common.floor_log_fgate``). ``block_sizes`` only counts the
# tiles a blockwise implementation with those tiles keeps (``pruning.chunk_tile_ranges``);
# ``interpret`` is ignored.


def _chunk_pair(rows: common.Rows, cols: common.Cols, delta, sm_scale: float):
  """The chunk pair in the compute dtype: biased logits s [B, Hq, T, S], the mask, the
  own-key diagonal [T, S], and q [B, T, Hq, D], k, v [B, S, Hq, D] (kv heads repeated)."""
  dt = _compute_dtype(rows.q, cols.k, cols.v, rows.c_hi, rows.c_lo, cols.c_hi, cols.c_lo)
  Hq, Hkv = rows.q.shape[2], cols.k.shape[2]
  q = rows.q.astype(dt)
  k = jnp.repeat(cols.k.astype(dt), Hq // Hkv, axis=2)
  v = jnp.repeat(cols.v.astype(dt), Hq // Hkv, axis=2)
  hq, lq = (x.astype(dt).transpose(0, 2, 1)[..., :, None] for x in (rows.c_hi, rows.c_lo))
  hk, lk = (x.astype(dt).transpose(0, 2, 1)[..., None, :] for x in (cols.c_hi, cols.c_lo))
  decay = (hq - hk) + (lq - lk)  # [B, Hq, T, S]
  s = sm_scale * jnp.einsum("bthd,bshd->bhts", q, k, precision=_HIGHEST) + decay
  mask = jnp.broadcast_to(rows.pos[:, None] >= cols.pos[None, :], s.shape)
  if rows.seg is not None:
    mask = mask & (rows.seg[:, :, None] == cols.seg[:, None, :])[:, None]
  if delta is not None:
    mask = mask & ~(decay < delta.astype(dt)[:, :, None, None])
  return s, mask, rows.pos[:, None] == cols.pos[None, :], q, k, v


def _kept_tiles(rows: common.Rows, cols: common.Cols, delta, block_sizes: BlockSizes):
  return pruning.chunk_tile_ranges(rows.c_hi, rows.c_lo, cols.c_hi, cols.c_lo, rows.seg,
                                   cols.seg, rows.pos, cols.pos, block_sizes.block_q,
                                   block_sizes.block_k, delta).kept_tiles()


def _probs(s, mask, lse):
  """P = exp(s - lse) on the visible pairs, exactly 0 elsewhere."""
  safe = jnp.where(jnp.isneginf(lse), 0.0, lse)[..., None]
  return jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - safe), 0.0)


def _anchored(do, dd, lse, s, mask, diag, v):
  """P from the global ``lse`` and X_ij = dP_ij - dd_i (0 at the own key), [B, Hq, T, S]."""
  dt = s.dtype
  p = _probs(s, mask, lse.astype(dt))
  dp = jnp.einsum("bthd,bshd->bhts", do.astype(dt), v, precision=_HIGHEST)
  x = jnp.where(diag, 0.0, dp - dd.astype(dt)[..., None])
  return p, x


def forward_chunk(rows: common.Rows, cols: common.Cols, delta, *, sm_scale: float,
                  block_sizes: BlockSizes, interpret: bool = False):
  """``xla.forward_chunk`` element-wise: o [B, T, Hq, D] and lse [B, Hq, T] over the keys of
  ``cols`` alone (lse -inf and o 0 where a query sees none), in the compute dtype, and the
  kept tiles [B, Hq] int32 at ``block_sizes``."""
  del interpret
  s, mask, _, _, _, v = _chunk_pair(rows, cols, delta, sm_scale)
  lse = jax.nn.logsumexp(jnp.where(mask, s, -jnp.inf), axis=-1)  # [B, Hq, T]
  o = jnp.einsum("bhts,bshd->bthd", _probs(s, mask, lse), v, precision=_HIGHEST)
  return o, lse, _kept_tiles(rows, cols, delta, block_sizes)


def row_terms_chunk(rows: common.Rows, cols: common.Cols, do, lse, dd, delta, *,
                    sm_scale: float, block_sizes: BlockSizes, interpret: bool = False):
  """``xla.row_terms_chunk`` element-wise: g_i = sum_{j != i} P_ij (dP_ij - dd_i) and
  r_i = sum_{j != i} P_ij over the keys of ``cols``, [B, Hq, T], P from the global lse."""
  del block_sizes, interpret
  s, mask, diag, _, _, v = _chunk_pair(rows, cols, delta, sm_scale)
  p, x = _anchored(do, dd, lse, s, mask, diag, v)
  return jnp.sum(p * x, axis=-1), jnp.sum(jnp.where(diag, 0.0, p), axis=-1)


def backward_chunk(rows: common.Rows, cols: common.Cols, do, lse, dd, g_b, delta, *,
                   sm_scale: float, block_sizes: BlockSizes, interpret: bool = False):
  """``xla.backward_chunk`` element-wise: with dS_ij = P_ij ((dP_ij - dd_i) - g_b_i), dq
  [B, T, Hq, D], dk, dv [B, S, Hkv, D] and the column part of dc, -sum_{i != j} dS_ij,
  [B, S, Hq], in the compute dtype."""
  del block_sizes, interpret
  B, T, Hq, D = rows.q.shape
  S, Hkv = cols.k.shape[1], cols.k.shape[2]
  s, mask, diag, q, k, v = _chunk_pair(rows, cols, delta, sm_scale)
  p, x = _anchored(do, dd, lse, s, mask, diag, v)
  ds = p * (x - g_b.astype(s.dtype)[..., None])
  group = lambda a: a.reshape(B, S, Hkv, Hq // Hkv, D).sum(axis=3)  # GQA: sum a group's heads
  dq = sm_scale * jnp.einsum("bhts,bshd->bthd", ds, k, precision=_HIGHEST)
  dk = group(sm_scale * jnp.einsum("bhts,bthd->bshd", ds, q, precision=_HIGHEST))
  dv = group(jnp.einsum("bhts,bthd->bshd", p, do.astype(s.dtype), precision=_HIGHEST))
  dc = -jnp.sum(jnp.where(diag, 0.0, ds), axis=2).transpose(0, 2, 1)
  return dq, dk, dv, dc

"""Naive forgetting attention: materialises the [T, S] logits. The oracle for every kernel.

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

"""Naive forgetting attention: materialises the [T, S] logits. The oracle for every kernel.

Shapes:
  q:          [B, T, Hq, D]
  k, v:       [B, S, Hkv, D]    S >= T; queries are the last T positions
  log_fgate:  [B, S, Hq]        log f_t <= 0 for every key position
  segment_ids:[B, S] int        queries use the last T entries
  returns o:  [B, T, Hq, D] in q.dtype, lse: [B, Hq, T]

Computes in float64 when x64 is enabled and any input is float64, otherwise in float32.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


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

  c = jnp.cumsum(log_fgate.astype(dt), axis=1)  # [B, S, Hq]
  c_q = c[:, S - T:]  # [B, T, Hq]
  decay = c_q.transpose(0, 2, 1)[:, :, :, None] - c.transpose(0, 2, 1)[:, :, None, :]  # [B, H, T, S]
  logits = scale * jnp.einsum("bthd,bshd->bhts", qf, kf) + decay

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

"""Ulysses: trade the sequence split for a head split, run the single-device op, trade back.

Inside ``shard_map`` over a mesh axis of P devices holding contiguous sequence chunks, one
``all_to_all`` turns q [B, S/P, Hq, D] into [B, S, Hq/P, D] (k, v and log f likewise), the
unchanged single-device op runs on the whole sequence for the device's heads (c, ACP,
packing and lse exactly as on one device), and one ``all_to_all`` turns o and lse back.
Segment ids are gathered whole ([B, S] int32).

Heads: Hq must be divisible by P. K/V heads go with their query heads in contiguous blocks
(device p gets q heads [p Hq/P, (p+1) Hq/P) and the kv heads they read), so Hkv must be
divisible by P, or P by Hkv, in which case each kv head is repeated P / Hkv times before
the exchange (its gradient sums the copies). Otherwise a ValueError names the heads.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.forgetting_attention import api as op_api
from pallas_kernels.forgetting_attention.common import BlockSizes


class UlyssesConfig(NamedTuple):
  axis_name: Any
  num_shards: int
  sm_scale: float
  impl: str
  block_sizes: Optional[BlockSizes]
  interpret: bool


def check_heads(num_q_heads: int, num_kv_heads: int, num_shards: int):
  """ValueError unless Ulysses can split these heads over ``num_shards`` devices."""
  P = num_shards
  if num_q_heads % P:
    raise ValueError(f"ulysses needs the q heads ({num_q_heads}) to be divisible by the "
                     f"number of devices on the sequence axis ({P})")
  if num_kv_heads % P and P % num_kv_heads:
    raise ValueError(f"ulysses needs the k/v heads ({num_kv_heads}) to divide, or be "
                     f"divisible by, the number of devices on the sequence axis ({P})")


def ulysses_attention(q, k, v, log_fgate, segment_ids, delta, cfg: UlyssesConfig):
  """o [B, L, Hq, D], lse [B, Hq, L] f32, kept and causal tiles [B, Hq] int32 (None for
  'reference') on this device's contiguous tokens; ``delta`` [B, Hq] is the global ACP
  threshold (or None). Call inside ``shard_map``."""
  P, ax = cfg.num_shards, cfg.axis_name
  Hq, Hkv = q.shape[2], k.shape[2]
  to_heads = lambda x: lax.all_to_all(x, ax, 2, 1, tiled=True)  # [B, L, H..] -> [B, S, H/P..]
  if Hkv % P:  # P % Hkv == 0: one kv head per device after repeating
    k, v = (jnp.repeat(x, P // Hkv, axis=2) for x in (k, v))
  qh, kh, vh, fh = (to_heads(x) for x in (q, k, v, log_fgate))
  seg = None if segment_ids is None else lax.all_gather(segment_ids, ax, axis=1, tiled=True)
  h = Hq // P
  if delta is not None:
    delta = lax.dynamic_slice_in_dim(delta, lax.axis_index(ax) * h, h, axis=1)
  out = op_api._dispatch(qh, kh, vh, fh, seg, delta, scale=cfg.sm_scale, impl=cfg.impl,
                         block_sizes=cfg.block_sizes, interpret=cfg.interpret,
                         return_stats=True)
  o, stats = out
  o = lax.all_to_all(o, ax, 1, 2, tiled=True)  # [B, S, Hq/P, D] -> [B, L, Hq, D]
  lse = lax.all_to_all(stats.lse, ax, 2, 1, tiled=True)  # [B, Hq/P, S] -> [B, Hq, L]
  heads = lambda x: None if x is None else lax.all_gather(x, ax, axis=1, tiled=True)
  return o, lse, heads(stats.kept_tiles), heads(stats.total_tiles)

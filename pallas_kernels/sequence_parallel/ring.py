"""The ring: every device's queries meet every device's keys, K/V travelling round the axis.

Inside ``shard_map`` over a mesh axis of P devices, each device holds its layout's L = S / P
tokens (``layouts``). Forward, P steps: at step s device d computes its queries against the
chunk of device d - s with the implementation's chunk kernel (``forward_chunk``: global
positions and the global c, so masks, decay and ACP are exactly the single-device op's)
and merges the partial (o, lse) by log-sum-exp in float32, while the chunk (k, v in GQA
form, never repeated; c hi and lo; segment ids; positions) moves one device on. The
transfer for step s + 1 is issued before step s's compute, so XLA can overlap the two.

Backward, two rings, as the single-device backward has two passes: the first sums the row
terms of the anchored dS (g, r; see ``common``) over every chunk, the second computes dS
against the global lse and g: dq and the row part of dc stay home, while dk, dv and the
column part of dc (float32) travel with their chunk and are home after P shifts. Nothing
gathered is kept: the residuals are the device's own q, k, v, c, segment ids and lse, so
memory per device is O(L). The gradient of log f is the reverse scan of dc across devices
(``cumsum``).

A step whose tiles are all masked (a later chunk under causality) or pruned computes
nothing (its kernel loops over empty tile ranges) and merges as lse = -inf, which changes
no result; every device still joins every transfer, so the program stays SPMD.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.forgetting_attention import common, pruning
from pallas_kernels.forgetting_attention.common import BlockSizes, Cols, Rows
from pallas_kernels.sequence_parallel import cumsum
from pallas_kernels.sequence_parallel.layouts import Layout


class RingConfig(NamedTuple):
  layout: Layout
  axis_name: Any
  sm_scale: float
  block_sizes: BlockSizes
  module: Any  # the implementation's module (its chunk kernels)
  interpret: bool = False  # Pallas kernels in interpret mode


def _shift(tree, cfg: RingConfig):
  """Every array of ``tree`` to the next device of the ring (device d -> d + 1 mod P)."""
  P = cfg.layout.num_shards
  perm = [(i, (i + 1) % P) for i in range(P)]
  return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis_name, perm), tree)


def _merge(o, lse, o_s, lse_s):
  """Two partial results over disjoint keys as one: o [B, T, H, D] f32, lse [B, H, T].

  Rows that saw no key in either keep o = 0 and lse = -inf; a NaN lse (NaN input) makes the
  row NaN.
  """
  new = jnp.logaddexp(lse, lse_s)
  safe = jnp.where(new == -jnp.inf, 0.0, new)
  w = jnp.exp(lse - safe).transpose(0, 2, 1)[..., None]  # [B, T, H, 1]
  w_s = jnp.exp(lse_s - safe).transpose(0, 2, 1)[..., None]
  return w * o + w_s * o_s, new


def _local(q, k, v, log_fgate, segment_ids, cfg: RingConfig):
  """This device's rows and its chunk of keys, with the global c and the global positions."""
  c_hi, c_lo = cumsum.global_cumsum(log_fgate, cfg.layout, cfg.axis_name)
  pos = jnp.asarray(cfg.layout.shard_positions())[lax.axis_index(cfg.axis_name)]
  return Rows(q, c_hi, c_lo, segment_ids, pos), Cols(k, v, c_hi, c_lo, segment_ids, pos)


def _causal_tiles(rows: Rows, cols: Cols, cfg: RingConfig):
  """[B, Hq] tiles a causal, unsegmented, unpruned step computes at the forward tiles."""
  bs = cfg.block_sizes
  return pruning.chunk_tile_ranges(rows.c_hi, rows.c_lo, cols.c_hi, cols.c_lo, None, None,
                                   rows.pos, cols.pos, bs.block_q, bs.block_k).kept_tiles()


def ring_attention(q, k, v, log_fgate, segment_ids, delta, cfg: RingConfig):
  """o [B, L, Hq, D] (q.dtype), lse [B, Hq, L] f32, kept and causal tiles [B, Hq] int32
  summed over the steps, on this device's tokens; call inside ``shard_map``."""
  return _ring(q, k, v, log_fgate, segment_ids, delta, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ring(q, k, v, log_fgate, segment_ids, delta, cfg: RingConfig):
  return _ring_fwd(q, k, v, log_fgate, segment_ids, delta, cfg)[0]


def _ring_fwd(q, k, v, log_fgate, segment_ids, delta, cfg: RingConfig):
  rows, cols = _local(q, k, v, log_fgate, segment_ids, cfg)
  B, L, Hq, D = q.shape
  o = jnp.zeros((B, L, Hq, D), jnp.float32)
  lse = jnp.full((B, Hq, L), -jnp.inf, jnp.float32)
  kept = total = jnp.zeros((B, Hq), jnp.int32)
  kw = dict(sm_scale=cfg.sm_scale, block_sizes=cfg.block_sizes, interpret=cfg.interpret)
  chunk = cols
  for step in range(cfg.layout.num_shards):
    nxt = _shift(chunk, cfg) if step + 1 < cfg.layout.num_shards else None
    o_s, lse_s, kept_s = cfg.module.forward_chunk(rows, chunk, delta, **kw)
    o, lse = _merge(o, lse, o_s, lse_s)
    kept = kept + kept_s.astype(jnp.int32)
    total = total + _causal_tiles(rows, chunk, cfg)
    chunk = nxt
  res = (rows, cols, delta, lse)
  return (o.astype(q.dtype), lse, kept, total), res


def _ring_bwd(cfg: RingConfig, res, cotangents):
  rows, cols, delta, lse = res
  q, k, v = rows.q, cols.k, cols.v
  do = cotangents[0].astype(q.dtype)
  dlse = cotangents[1].astype(jnp.float32)
  P = cfg.layout.num_shards
  kw = dict(sm_scale=cfg.sm_scale, block_sizes=cfg.block_sizes, interpret=cfg.interpret)
  dd = common.own_key_dot(do, v)  # [B, Hq, L]: the anchor of dS, at the device's own keys
  # Ring 1: the row terms g, r of every query over every chunk.
  g = r = jnp.zeros(lse.shape, jnp.float32)
  chunk = cols
  for step in range(P):
    nxt = _shift(chunk, cfg) if step + 1 < P else None
    g_s, r_s = cfg.module.row_terms_chunk(rows, chunk, do, lse, dd, delta, **kw)
    g, r = g + g_s, r + r_s
    chunk = nxt
  g_b = g - dlse
  row_sums = (g - g_b * r).transpose(0, 2, 1)  # [B, L, Hq]: sum_{j != i} dS_ij
  # Ring 2: dq at home; dk, dv and the column part of dc ride with their chunk.
  dq = jnp.zeros(q.shape, jnp.float32)
  acc = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
         jnp.zeros(cols.c_hi.shape, jnp.float32))
  chunk = cols
  for step in range(P):
    nxt = _shift(chunk, cfg) if step + 1 < P else None
    dq_s, dk_s, dv_s, dc_s = cfg.module.backward_chunk(rows, chunk, do, lse, dd, g_b, delta, **kw)
    dq = dq + dq_s
    acc = _shift((acc[0] + dk_s, acc[1] + dv_s, acc[2] + dc_s), cfg)
    chunk = nxt
  dk, dv, dc_col = acc  # after P shifts every accumulator is back with its chunk
  dlog_f = cumsum.global_reverse_cumsum(dc_col + row_sums, cfg.layout, cfg.axis_name)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dlog_f, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)

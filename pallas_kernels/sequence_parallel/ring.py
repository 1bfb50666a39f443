"""The ring: every device's queries meet every device's keys, K/V travelling round the axis.

Inside ``shard_map`` over a mesh axis of P devices, each device holds its layout's L = S / P
tokens (``layouts``). Forward, P steps (one loop): at step s device d computes its queries against the
chunk of device d - s with the implementation's chunk kernel (``forward_chunk``: global
positions and the global c, so masks, decay and ACP are exactly the single-device op's)
and merges the partial (o, lse) by log-sum-exp in float32 (float64 for float64 inputs:
``impl="reference"`` under x64), while the chunk (k, v in GQA form, never repeated; c hi
and lo; segment ids; positions) moves one device on. The transfer for step s + 1 is issued
before step s's compute, so XLA can overlap the two.

Backward, two rings, as the single-device backward has two passes: the first sums the row
terms of the anchored dS (g, r; see ``common``) over every chunk, the second computes dS
against the global lse and g: dq and the row part of dc stay home, while dk, dv and the
column part of dc (float32, or float64 as above) travel with their chunk and are home after
P shifts. Nothing gathered is kept: the residuals are the device's own q, k, v, c, segment
ids and lse, so memory per device is O(L). The gradient of log f is the reverse scan of dc across devices
(``cumsum``).

A step whose tiles are all masked (a later chunk under causality) or pruned computes
nothing (its kernel loops over empty tile ranges) and merges as lse = -inf, which changes
no result; every device still joins every transfer, so the program stays SPMD.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

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
  steps: Optional[int] = None  # ring steps when ACP prunes the rest (contiguous only); None: P
  sync_axes: tuple = ()  # every mesh axis the devices of one program span (for the decision)


def _shift(tree, cfg: RingConfig, by: int = 1):
  """Every array of ``tree`` ``by`` devices on along the ring (device d -> d + by mod P)."""
  P = cfg.layout.num_shards
  perm = [(i, (i + by) % P) for i in range(P)]
  return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis_name, perm), tree)


def _steps(chunk, state, step_fn, cfg: RingConfig, count: int, ship_last: bool):
  """``count`` ring steps as one loop: each step issues the transfer of the next chunk, then
  computes on the current one. A loop, not an unrolled sequence, so that every step reuses
  the same two chunk buffers (unrolled, XLA kept each step's received chunk alive: memory
  per device grew with P). ``ship_last``: whether the last step ships its chunk on too."""

  def body(carry, _):
    chunk, state = carry
    nxt = _shift(chunk, cfg)
    return (nxt, step_fn(chunk, state)), None

  looped = count if ship_last else count - 1
  if looped > 0:
    (chunk, state), _ = lax.scan(body, (chunk, state), None, length=looped)
  if not ship_last:
    state = step_fn(chunk, state)
  return chunk, state


def _ring_pass(cols: Cols, state, step_fn, cfg: RingConfig, prunable, on_truncated=None):
  """``state = step_fn(chunk, state)`` against every chunk of the ring, the device's own
  first, then the one of the device before it, and so on.

  With ``cfg.steps = n < P`` (the contiguous layout with ACP), the first n chunks are always
  visited and the other P - n only unless ``prunable`` (a bool every device agrees on) says
  ACP prunes all of them; then ``on_truncated(state)`` finishes instead. The transfer of the
  next chunk is issued before each step's compute.
  """
  P = cfg.layout.num_shards
  n = cfg.steps or P
  chunk, state = _steps(cols, state, step_fn, cfg, n, ship_last=False)
  if n == P:
    return state

  def rest(args):
    chunk, state = args
    return _steps(_shift(chunk, cfg), state, step_fn, cfg, P - n, ship_last=False)[1]

  def truncated(args):
    return args[1] if on_truncated is None else on_truncated(args[1])

  return lax.cond(prunable, truncated, rest, (chunk, state))


def _prunable(rows: Rows, delta, cfg: RingConfig):
  """Whether ACP prunes every pair of a query chunk with a key chunk n = ``cfg.steps`` or
  more chunks before it (contiguous layout): a bool, the same on every device.

  c does not increase, so the pair's largest decay is c(first query of chunk d) - c(last key
  of chunk d - n), and the nearest such key chunk is the one with the largest. The pair is
  pruned exactly (every element dropped) when that corner is below delta for every batch
  row and head. The chunk boundaries' c (hi, lo) are gathered from every device (4 B Hq
  floats each); a NaN corner or a -inf delta keeps the whole ring.
  """
  n, P = cfg.steps, cfg.layout.num_shards
  ends = jnp.stack([rows.c_hi[:, 0], rows.c_lo[:, 0], rows.c_hi[:, -1], rows.c_lo[:, -1]])
  ends = lax.all_gather(lax.stop_gradient(ends), cfg.axis_name)  # [P, 4, B, Hq], device order
  ok = jnp.bool_(True)
  for d in range(n, P):
    corner = (ends[d, 0] - ends[d - n, 2]) + (ends[d, 1] - ends[d - n, 3])
    ok = ok & jnp.all(corner < delta)
  ok = ok.astype(jnp.int32)
  for axis in cfg.sync_axes:  # every device of the program takes the same branch
    ok = lax.pmin(ok, axis)
  return ok > 0


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


def _causal_tiles(rows: Rows, cfg: RingConfig):
  """[B, Hq] tiles a causal, unsegmented, unpruned full ring computes at the forward tiles
  (from the layout's positions: nothing travels)."""
  bs = cfg.block_sizes
  total = 0
  for pos in cfg.layout.shard_positions():
    total = total + pruning.chunk_tile_ranges(
        rows.c_hi, rows.c_lo, rows.c_hi, rows.c_lo, None, None, rows.pos, jnp.asarray(pos),
        bs.block_q, bs.block_k).kept_tiles()
  return total


def ring_attention(q, k, v, log_fgate, segment_ids, delta, cfg: RingConfig):
  """o [B, L, Hq, D] (q.dtype), lse [B, Hq, L] f32, kept and causal tiles [B, Hq] int32
  summed over the steps, and the ring steps run (int32), on this device's tokens; call
  inside ``shard_map``."""
  return _ring(q, k, v, log_fgate, segment_ids, delta, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ring(q, k, v, log_fgate, segment_ids, delta, cfg: RingConfig):
  return _ring_fwd(q, k, v, log_fgate, segment_ids, delta, cfg)[0]


def _acc_dtype(q, log_fgate):
  """The merge and accumulation dtype: float32, or float64 for float64 inputs (x64, the
  reference's chunk functions)."""
  return jnp.promote_types(jnp.promote_types(q.dtype, log_fgate.dtype), jnp.float32)


def _kwargs(cfg: RingConfig):
  return dict(sm_scale=cfg.sm_scale, block_sizes=cfg.block_sizes, interpret=cfg.interpret)


def _ring_fwd(q, k, v, log_fgate, segment_ids, delta, cfg: RingConfig):
  rows, cols = _local(q, k, v, log_fgate, segment_ids, cfg)
  B, L, Hq, D = q.shape
  acc = _acc_dtype(q, log_fgate)
  P = cfg.layout.num_shards
  prunable = _prunable(rows, delta, cfg) if (cfg.steps or P) < P else jnp.bool_(False)

  def step(chunk, state):
    o, lse, kept = state
    o_s, lse_s, kept_s = cfg.module.forward_chunk(rows, chunk, delta, **_kwargs(cfg))
    o, lse = _merge(o, lse, o_s, lse_s)
    return o, lse, kept + kept_s.astype(jnp.int32)

  init = (jnp.zeros((B, L, Hq, D), acc), jnp.full((B, Hq, L), -jnp.inf, acc),
          jnp.zeros((B, Hq), jnp.int32))
  o, lse, kept = _ring_pass(cols, init, step, cfg, prunable)
  steps = jnp.where(prunable, cfg.steps or P, P).astype(jnp.int32)
  res = (rows, cols, delta, lse, prunable)
  return (o.astype(q.dtype), lse, kept, _causal_tiles(rows, cfg), steps), res


def _ring_bwd(cfg: RingConfig, res, cotangents):
  rows, cols, delta, lse, prunable = res
  q, k, v = rows.q, cols.k, cols.v
  do = cotangents[0].astype(q.dtype)
  acc = lse.dtype  # the forward's accumulation dtype
  dlse = cotangents[1].astype(acc)
  kw = _kwargs(cfg)
  dd = common.own_key_dot(do, v)  # [B, Hq, L]: the anchor of dS, at the device's own keys

  # Ring 1: the row terms g, r of every query over every chunk.
  def row_step(chunk, state):
    g_s, r_s = cfg.module.row_terms_chunk(rows, chunk, do, lse, dd, delta, **kw)
    return state[0] + g_s, state[1] + r_s

  zeros = jnp.zeros(lse.shape, acc)
  g, r = _ring_pass(cols, (zeros, zeros), row_step, cfg, prunable)
  g_b = g - dlse
  row_sums = (g - g_b * r).transpose(0, 2, 1)  # [B, L, Hq]: sum_{j != i} dS_ij

  # Ring 2: dq at home; dk, dv and the column part of dc ride with their chunk.
  def grad_step(chunk, state):
    dq, acc = state
    dq_s, dk_s, dv_s, dc_s = cfg.module.backward_chunk(rows, chunk, do, lse, dd, g_b, delta, **kw)
    return dq + dq_s, _shift((acc[0] + dk_s, acc[1] + dv_s, acc[2] + dc_s), cfg)

  def home(state):  # after n of P shifts an accumulator is n devices past its chunk's home
    return state[0], _shift(state[1], cfg, by=-(cfg.steps or 0))

  travel = (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc), jnp.zeros(cols.c_hi.shape, acc))
  dq, (dk, dv, dc_col) = _ring_pass(cols, (jnp.zeros(q.shape, acc), travel), grad_step,
                                    cfg, prunable, on_truncated=home)
  dlog_f = cumsum.global_reverse_cumsum(dc_col + row_sums, cfg.layout, cfg.axis_name)
  # c is in log f's dtype (float32, or float64 under x64)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          dlog_f.astype(rows.c_hi.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)

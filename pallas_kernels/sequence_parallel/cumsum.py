"""The global cumulative gate c across the devices of a mesh axis, in natural token order.

c_t = sum_{s <= t} log f_s runs over the whole sequence, but each device holds only its
layout's tokens. Each device holds runs of ``run_length`` consecutive positions (one run
for ``contiguous``, two for ``zigzag``, one per stripe for ``striped``), so:

  1. each device takes the inclusive double-float cumulative sum within each of its runs
     (``common.compensated_cumsum``, as the single-device op does);
  2. the run totals (hi, lo) [B, R, H] are gathered from every device (``all_gather``:
     R values per device, not the sequence, except for narrow stripes);
  3. every device puts all P R totals in natural order and takes the same exclusive prefix
     sum of them in double-float (a scan of TwoSum additions), its runs' offsets;
  4. offset + local sum, once more in double-float.

The result equals the single-device c to about 2^-48 relative (``hi + lo``): every
addition is a double-float one; only the order of the additions differs. The gradient of
log f is the reverse (suffix) cumulative sum of dc, which crosses devices the same way,
in float32 as the single-device op takes it. Float64 gates (``impl="reference"`` under x64)
are summed as float64 pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.forgetting_attention import common
from pallas_kernels.sequence_parallel.layouts import Layout


def _run_tables(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
  """(natural run index of each device's runs [P, R], and the (device, run) flat index of
  each natural run [P R])."""
  starts = layout.shard_positions()[:, ::layout.run_length]  # [P, R] first position of each run
  natural = starts // layout.run_length
  flat = np.empty(natural.size, np.int32)
  flat[natural.reshape(-1)] = np.arange(natural.size, dtype=np.int32)
  return natural.astype(np.int32), flat


def _pair_scan(hi, lo, reverse=False):
  return lax.associative_scan(lambda a, b: common.add_pairs(*a, *b), (hi, lo), axis=0,
                              reverse=reverse)


def global_cumsum(log_f: jax.Array, layout: Layout, axis_name) -> tuple[jax.Array, jax.Array]:
  """(c_hi, c_lo) [B, L, H] at this device's tokens; ``log_f`` [B, L, H] in layout order.

  Call inside ``shard_map`` over ``axis_name`` (of size ``layout.num_shards``).
  """
  B, L, H = log_f.shape
  run = layout.run_length
  R = L // run
  hi, lo = common.compensated_cumsum(log_f.reshape(B, R, run, H), axis=2)
  totals = jnp.stack([hi[:, :, -1], lo[:, :, -1]])  # [2, B, R, H]
  gathered = lax.all_gather(totals, axis_name)  # [P, 2, B, R, H]
  natural, flat = _run_tables(layout)
  t = jnp.moveaxis(gathered, 3, 1).reshape(-1, 2, B, H)[flat]  # [P R, 2, B, H] natural order
  inc_hi, inc_lo = _pair_scan(t[:, 0], t[:, 1])
  zero = jnp.zeros((1, B, H), hi.dtype)
  ex_hi = jnp.concatenate([zero, inc_hi[:-1]])  # exclusive prefix of the runs before each run
  ex_lo = jnp.concatenate([zero, inc_lo[:-1]])
  mine = jnp.asarray(natural)[lax.axis_index(axis_name)]  # [R]
  off_hi = jnp.moveaxis(ex_hi[mine], 0, 1)[:, :, None]  # [B, R, 1, H]
  off_lo = jnp.moveaxis(ex_lo[mine], 0, 1)[:, :, None]
  c_hi, c_lo = common.add_pairs(hi, lo, off_hi, off_lo)
  return c_hi.reshape(B, L, H), c_lo.reshape(B, L, H)


def global_reverse_cumsum(dc: jax.Array, layout: Layout, axis_name) -> jax.Array:
  """sum_{s >= t} dc_s in natural order, [B, L, H] at this device's tokens, float32 (float64
  for float64 ``dc``)."""
  B, L, H = dc.shape
  run = layout.run_length
  R = L // run
  dc = dc.astype(jnp.promote_types(dc.dtype, jnp.float32))
  local = common.reverse_cumsum(dc.reshape(B, R, run, H), axis=2)
  gathered = lax.all_gather(local[:, :, 0], axis_name)  # [P, B, R, H] run totals
  natural, flat = _run_tables(layout)
  t = jnp.moveaxis(gathered, 2, 1).reshape(-1, B, H)[flat]  # [P R, B, H] natural order
  inc = common.reverse_cumsum(t, axis=0)
  ex = jnp.concatenate([inc[1:], jnp.zeros((1, B, H), dc.dtype)])  # runs after each run
  mine = jnp.asarray(natural)[lax.axis_index(axis_name)]
  return (local + jnp.moveaxis(ex[mine], 0, 1)[:, :, None]).reshape(B, L, H)

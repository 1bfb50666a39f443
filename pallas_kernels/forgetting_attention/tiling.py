"""Padding, tile geometry and per-pass set-up shared by the Pallas kernels (gpu.py, tpu.py).

Each backend pads T, S and D to its own legal tile shapes and lays the arrays out its own
way; the sizes and the kept-tile ranges at those sizes are the same for both, and live
here (the anchor of the backward's dS lives in ``common``, which every implementation uses).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.forgetting_attention import pruning
from pallas_kernels.forgetting_attention.common import BlockSizes


def idiv(x: jax.Array, n: int) -> jax.Array:
  """x // n for a non-negative int32 index inside a kernel or an index map, with n a Python
  int: ``lax.div`` with n made int32, so it also traces with jax_enable_x64 on (where a bare
  Python int would become int64)."""
  return lax.div(x, np.int32(n))


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def pad_axis(x: jax.Array, axis: int, size: int, mode: str = "constant") -> jax.Array:
  """Pads ``x`` along ``axis`` to ``size`` (zeros, or the edge value); no-op when it fits."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, mode=mode)


class TileGeometry:
  """Padded sizes of one pass with q tile ``bq`` and kv tile ``bk``.

  A tile is never larger than the sequence needs (the next power of two) nor smaller than
  the backend allows (``min_bq``, ``min_bk``); ``dp`` is the padded head dim.
  """

  def __init__(self, q, k, bq: int, bk: int, *, min_bq: int, min_bk: int, dp: int):
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    self.B, self.T, self.S, self.Hq, self.Hkv, self.D = B, T, S, Hq, Hkv, D
    self.group = Hq // Hkv
    self.bq = max(min_bq, min(bq, next_pow2(T)))
    self.bk = max(min_bk, min(bk, next_pow2(S)))
    self.dp = dp
    self.nq = -(-T // self.bq)
    self.nk = -(-S // self.bk)
    self.tp = self.nq * self.bq
    self.sk = self.nk * self.bk
    self.off = S - T


def forward_ranges(g: TileGeometry, c_hi, c_lo, segment_ids, delta, block_sizes: BlockSizes):
  """(kept-tile ranges at the kernel's tiles, kept-tile count [B, Hq] at the requested tiles).

  The count is taken at the requested ``block_q x block_k`` so that it matches the
  ``total_tiles`` api reports, also when the kernel had to round its tiles.
  """
  ranges = pruning.tile_ranges(c_hi, c_lo, segment_ids, g.T, g.bq, g.bk, delta)
  if (g.bq, g.bk) == (block_sizes.block_q, block_sizes.block_k):
    return ranges, ranges.kept_tiles()
  kept = pruning.tile_ranges(c_hi, c_lo, segment_ids, g.T, block_sizes.block_q,
                             block_sizes.block_k, delta).kept_tiles()
  return ranges, kept

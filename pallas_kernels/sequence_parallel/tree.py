"""Tree attention for decoding: queries against a KV cache sharded along the sequence.

Inside ``shard_map`` over a mesh axis of P devices, each device holds a slice of the cache
(keys, values, their c as a double-float pair, their global positions) and every device
holds the same few new queries with their own c and positions. Each device computes its
partial (o, lse) with the implementation's chunk kernel (``forward_chunk``: global
positions and the global c, so the decay and ACP are exact), and the partials are combined
with one ``pmax`` of lse and one ``psum`` of [o e^(lse - m), e^(lse - m)]:

    o = sum_d o_d e^(lse_d - m) / sum_d e^(lse_d - m),   lse = m + log sum_d e^(lse_d - m).

Two collectives per step, whatever P. A device whose keys are all masked or pruned
computes nothing (its kernel's tile loops are empty) and contributes e^-inf = 0, but joins
the collectives, so the program stays SPMD. The forward only: decoding needs no gradient.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.forgetting_attention import registry
from pallas_kernels.forgetting_attention.common import BlockSizes, Cols, Rows
from pallas_kernels.sequence_parallel.api import _OnItsPlatform


def tree_attention(rows: Rows, cols: Cols, delta: Optional[jax.Array], *, axis_name,
                   sm_scale: float, impl: str = "xla", block_sizes: Optional[BlockSizes] = None,
                   interpret: bool = False):
  """o [B, T, Hq, D] float32 and lse [B, Hq, T] of the queries ``rows`` (the same on every
  device of ``axis_name``) against the union of every device's ``cols``; call inside
  ``shard_map``. ``impl``: an implementation with chunk kernels (``registry``)."""
  if impl not in registry.chunk_impls():
    raise ValueError(f"impl={impl!r} has no chunk kernels; use one of {registry.chunk_impls()}")
  bs = block_sizes or registry.default_block_sizes(impl, rows.q.shape[-1])
  kernels = registry.module(impl)
  if registry.REGISTRY[impl].backend is not None and not interpret:
    # Lowers for the implementation's own platforms only; elsewhere the op's ValueError.
    kernels = _OnItsPlatform(impl)
  o, lse, _ = kernels.forward_chunk(rows, cols, delta, sm_scale=sm_scale, block_sizes=bs,
                                    interpret=interpret)
  m = lax.pmax(lse, axis_name)  # [B, Hq, T]
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)  # no key anywhere: weights 0, o 0, lse -inf
  w = jnp.exp(lse - m_safe)
  both = jnp.concatenate([o * w.transpose(0, 2, 1)[..., None],
                          w.transpose(0, 2, 1)[..., None]], axis=-1)  # [B, T, Hq, D + 1]
  both = lax.psum(both, axis_name)
  num, den = both[..., :-1], both[..., -1]  # [B, T, Hq, D], [B, T, Hq]
  o = num / jnp.where(den == 0, 1.0, den)[..., None]
  lse = jnp.where(den.transpose(0, 2, 1) == 0, -jnp.inf,
                  m_safe + jnp.log(jnp.where(den == 0, 1.0, den)).transpose(0, 2, 1))
  return o, lse

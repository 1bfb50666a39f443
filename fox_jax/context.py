"""Context parallelism in the model: the sequence split over the mesh's 'context' axis.

When the mesh in scope (``jax.set_mesh``, as ``sharding.activation_rules`` sets it) has a
'context' axis of size P > 1, the model runs on a sequence laid out for the configured
strategy (``ModelConfig.context_strategy``) and split over that axis:

  where the batch enters   tokens, targets, segment ids, positions and loss weights are
                           permuted once into the layout's order
                           (:meth:`ContextParallel.permute_batch`); positions are natural
                           in-document positions, so RoPE and packing stay exact whatever
                           the order.
  per-token layers         embedding, norms, MLP, LM head and loss do not care about order.
  attention                ``sequence_parallel_attention`` with the strategy, over 'context'
                           (batch over the data-parallel axes that divide it, heads over
                           'tensor' when the q and k/v heads both divide it).
  key/value shift          each token's predecessor in natural order, from the device that
                           holds it (``layouts.previous_tokens``: a one-token halo per run).
  per-token outputs        losses are permuted back (:meth:`ContextParallel.unpermute`).

The loss is a sum over tokens, so it is the same in any order; per-token losses and
evaluation report in natural order. Without a context axis (or with P = 1) nothing changes.

Strategies (``pallas_kernels.sequence_parallel.STRATEGIES``): "zigzag" (the default: balanced
causal work, two one-token halos per device for KV-shift), "striped" (balanced; with
``context_stripe`` w the halo is one token per stripe), "ring" (contiguous: simplest, the
last device does P times the first one's causal work), "ulysses" (all-to-all to heads:
needs the heads to split over P; contiguous order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from jax.sharding import PartitionSpec as P

from fox_jax import sharding
from fox_jax.config import ModelConfig
from pallas_kernels.sequence_parallel import api as sp_api
from pallas_kernels.sequence_parallel import layouts
from pallas_kernels.sequence_parallel import ulysses as ulysses_lib

AXIS = "context"
TENSOR_AXIS = "tensor"
STRATEGY_NAMES = tuple(sp_api.STRATEGIES)


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """The sequence layout and the mesh axes of one model call under context parallelism."""

  mesh: Any                      # jax.sharding.Mesh or AbstractMesh
  strategy: str
  layout: layouts.Layout
  batch_axes: tuple[str, ...]    # the data-parallel axes the batch is split over
  head_axes: tuple[str, ...] = ()  # the tensor-parallel axis the heads are split over

  @property
  def num_shards(self) -> int:
    return self.layout.num_shards

  def _spec(self, x: jax.Array) -> P:
    """[B, T, heads?, ...]: batch and sequence split, heads too where they divide."""
    rest = [None] * (x.ndim - 2)
    if rest and self.head_axes and x.shape[2] % sp_api._axes_size(self.mesh, self.head_axes) == 0:
      rest[0] = self.head_axes
    return P(self.batch_axes or None, AXIS, *rest)

  def permute(self, x: jax.Array, axis: int = 1) -> jax.Array:
    return layouts.permute(x, self.layout, axis)

  def unpermute(self, x: jax.Array, axis: int = 1) -> jax.Array:
    return layouts.unpermute(x, self.layout, axis)

  def permute_batch(self, batch):
    """A batch NamedTuple of [B, T] arrays (``data.Batch``, every field) in the layout's
    order."""
    return type(batch)(*(self.permute(x) for x in batch))

  def previous(self, x: jax.Array) -> jax.Array:
    """x [B, T, ...] in the layout's order -> each token's predecessor in natural order
    (zero at position 0), same order and sharding."""
    spec = self._spec(x)
    fn = lambda y: layouts.previous_tokens(y, self.layout, AXIS)
    return jax.shard_map(fn, mesh=self.mesh, in_specs=spec, out_specs=spec,
                         check_vma=False)(x)

  def attention(self, q, k, v, log_fgate, **kwargs):
    """``sequence_parallel_attention`` with this strategy and axes (kwargs: segment_ids,
    pruning, impl, block_sizes, return_stats)."""
    return sp_api.sequence_parallel_attention(
        q, k, v, log_fgate, mesh=self.mesh, strategy=self.strategy, axis_name=AXIS,
        batch_axes=self.batch_axes or None, head_axes=self._heads(q, k),
        stripe=self.layout.stripe, **kwargs)

  def _heads(self, q, k):
    """The head axes when both q's and k's heads split over them (and, for Ulysses, each
    device's share still splits over the context axis), else None (heads replicated)."""
    if not self.head_axes:
      return None
    n = sp_api._axes_size(self.mesh, self.head_axes)
    hq, hkv = q.shape[2], k.shape[2]
    if hq % n or hkv % n:
      return None
    if self.strategy == "ulysses":
      try:
        ulysses_lib.check_heads(hq // n, hkv // n, self.num_shards)
      except ValueError:
        return None
    return self.head_axes


def context_size(mesh=None) -> int:
  """Size of the 'context' axis of ``mesh`` (default: the mesh in scope); 1 without one."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or getattr(mesh, "empty", False) or AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[AXIS])


def active(cfg: ModelConfig, batch: int, length: int, mesh=None) -> Optional[ContextParallel]:
  """The context parallelism of a [batch, length] model call under ``mesh`` (default: the
  mesh in scope), or None when there is no 'context' axis of size > 1."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  P_ = context_size(mesh)
  if P_ == 1:
    return None
  layout = sp_api.strategy_layout(cfg.context_strategy, length, P_, cfg.context_stripe)
  heads = ((TENSOR_AXIS,) if TENSOR_AXIS in mesh.axis_names and mesh.shape[TENSOR_AXIS] > 1
           else ())
  return ContextParallel(mesh, cfg.context_strategy, layout, sharding.batch_axes(mesh, batch), heads)


def check(cfg: ModelConfig, num_shards: int, length: int) -> None:
  """ValueError naming the field when ``cfg`` cannot run a sequence of ``length`` tokens
  split over ``num_shards`` devices (nothing to check when ``num_shards`` is 1)."""
  if num_shards == 1:
    return
  try:
    sp_api.strategy_layout(cfg.context_strategy, length, num_shards, cfg.context_stripe)
  except ValueError as e:
    raise ValueError(f"seq_len {length} cannot be laid out for context_strategy "
                     f"{cfg.context_strategy!r} over context={num_shards}: {e}") from None
  if cfg.context_strategy == "ulysses":
    try:
      ulysses_lib.check_heads(cfg.num_heads, cfg.num_kv_heads, num_shards)
    except ValueError as e:
      raise ValueError(f"num_heads / num_kv_heads with context_strategy 'ulysses' over "
                       f"context={num_shards}: {e}") from None

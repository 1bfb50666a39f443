"""``sequence_parallel_attention``: forgetting attention over a sequence sharded on a mesh axis.

Four strategies, one call:

  ring      contiguous chunks; K/V travel round the axis (``ring``). Simple; under causal
            attention the last device does P times the first one's work.
  zigzag    the ring on the zigzag layout (device d holds chunks d and 2P - 1 - d of 2P):
            balanced causal work.
  striped   the ring on the striped layout (token i on device i mod P, or stripes of
            ``stripe`` tokens): balanced to within a stripe.
  ulysses   all-to-all to a head split, the single-device op on the whole sequence, and
            back (``ulysses``); natural (contiguous) order; heads must split over the axis.

Arrays come in the strategy's layout order, sharded or not: a model permutes its inputs
once with ``layouts.permute(x, strategy_layout(...))`` and its per-token outputs back with
``layouts.unpermute``. Every strategy computes the single-device op's function on the
natural-order sequence: the same zero-gate semantics, the same ACP threshold (q/k bounds
reduced over the axis, S the whole length, so every device prunes what one device would),
and gradients for q, k, v and log f.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from pallas_kernels.forgetting_attention import api as op_api
from pallas_kernels.forgetting_attention import common, registry
from pallas_kernels.forgetting_attention import pruning as pruning_lib
from pallas_kernels.forgetting_attention.common import AttentionStats, BlockSizes
from pallas_kernels.forgetting_attention.pruning import Pruning
from pallas_kernels.sequence_parallel import ring as ring_lib
from pallas_kernels.sequence_parallel import ulysses as ulysses_lib
from pallas_kernels.sequence_parallel.layouts import Layout

# strategy -> the layout its arrays come in
STRATEGIES = {"ring": "contiguous", "zigzag": "zigzag", "striped": "striped",
              "ulysses": "contiguous"}


class SequenceParallelStats(NamedTuple):
  """What ``return_stats=True`` gives beside the output.

  lse: [B, Hq, S] float32, in the layout's order like the output.
  kept_tiles, total_tiles: [B, Hq] int32 tiles computed and tiles a causal, unpruned,
    unsegmented run of the same strategy computes, summed over the devices (None for
    ``impl="reference"`` under Ulysses).
  ring_steps: int32 scalar, the ring steps each device ran: P for the ring strategies, fewer
    when ``ring_steps`` was given and ACP pruned the rest; 0 for Ulysses.
  """

  lse: jax.Array
  kept_tiles: Optional[jax.Array]
  total_tiles: Optional[jax.Array]
  ring_steps: jax.Array

  def kept_fraction(self, per_head: bool = False) -> jax.Array:
    return AttentionStats(self.lse, self.kept_tiles, self.total_tiles).kept_fraction(per_head)

  def tile_summary(self) -> str:
    return AttentionStats(self.lse, self.kept_tiles, self.total_tiles).tile_summary()


class _OnItsPlatform:
  """A Pallas implementation's chunk kernels behind ``lax.platform_dependent``: they lower
  for the platforms of the implementation's backend; lowering for any other raises the
  ValueError the single-device op raises there (``api._on_platform``)."""

  def __init__(self, impl: str):
    self.impl = impl
    self.module = registry.module(impl)

  def _call(self, kernel: str, *args, **kwargs):
    run = lambda *a: tuple(jax.tree.leaves(getattr(self.module, kernel)(*a, **kwargs)))
    shapes = jax.eval_shape(run, *args)
    unavailable = lambda *_: tuple(op_api._unavailable_p.bind(
        impl=self.impl, shapes=tuple((s.shape, jnp.dtype(s.dtype)) for s in shapes)))
    return lax.platform_dependent(*args, **{p: run for p in op_api._PLATFORMS[self.impl]},
                                  default=unavailable)

  def forward_chunk(self, *args, **kwargs):
    return self._call("forward_chunk", *args, **kwargs)

  def row_terms_chunk(self, *args, **kwargs):
    return self._call("row_terms_chunk", *args, **kwargs)

  def backward_chunk(self, *args, **kwargs):
    return self._call("backward_chunk", *args, **kwargs)


def _auto_chunk_impl() -> str:
  """The ring's "auto": the chunk kernels of the default backend's Pallas implementation,
  else xla."""
  backend = jax.default_backend()
  for name in registry.chunk_impls():
    if registry.REGISTRY[name].backend == backend:
      return name
  return "xla"


def strategy_layout(strategy: str, length: int, num_shards: int, stripe: int = 1) -> Layout:
  """The layout of ``strategy``'s arrays for a sequence of ``length`` over ``num_shards``
  devices; a ValueError naming the argument if the length cannot be split that way."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
  return Layout(STRATEGIES[strategy], length, num_shards, stripe)


def _axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  size = 1
  for a in names:
    size *= mesh.shape[a]
  return size


def _names(axes) -> tuple:
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def _check_mesh(mesh, axis_name, batch_axes, B, head_axes=None, heads=()):
  if not isinstance(mesh, (Mesh, AbstractMesh)):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (or the AbstractMesh of a jit's "
                     f"context), got {type(mesh).__name__}")
  names = _names(batch_axes)
  head_names = _names(head_axes)
  for name, what in ([(axis_name, "axis_name")] + [(a, "batch_axes") for a in names]
                     + [(a, "head_axes") for a in head_names]):
    if name not in mesh.axis_names:
      raise ValueError(f"{what} {name!r} is not an axis of the mesh {mesh.axis_names}")
  if axis_name in names:
    raise ValueError(f"axis_name {axis_name!r} cannot also be a batch axis")
  if set(head_names) & (set(names) | {axis_name}):
    raise ValueError(f"head_axes {head_axes} cannot also be the sequence or a batch axis")
  h = _axes_size(mesh, head_axes)
  for n, what in heads:
    if n % h:
      raise ValueError(f"{what} ({n}) must be divisible by the size of head_axes {head_axes} "
                       f"({h})")
  if B % _axes_size(mesh, batch_axes):
    raise ValueError(f"batch {B} must be divisible by the size of batch_axes {batch_axes} "
                     f"({_axes_size(mesh, batch_axes)})")


def sequence_parallel_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_fgate: jax.Array,
    *,
    mesh: Union[Mesh, AbstractMesh],
    strategy: str = "zigzag",
    axis_name: str = "context",
    batch_axes=None,
    head_axes=None,
    segment_ids: Optional[jax.Array] = None,
    sm_scale: Optional[float] = None,
    pruning: Optional[Pruning] = None,
    impl: str = "auto",
    block_sizes: Optional[BlockSizes] = None,
    interpret: bool = False,
    return_stats: bool = False,
    stripe: int = 1,
    ring_steps: Optional[int] = None,
) -> Union[jax.Array, tuple[jax.Array, SequenceParallelStats]]:
  """Causal forgetting attention of a whole sequence sharded over ``mesh``'s ``axis_name``.

  Args:
    q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; log_fgate: [B, S, Hq] float32 (<= 0);
      segment_ids: [B, S] integers or None: as for ``forgetting_attention`` with T = S
      (self-attention over the whole sequence), every array in ``strategy``'s layout order
      (:func:`strategy_layout`, ``layouts.permute``).
    mesh: the device mesh (or, inside ``jit`` under ``jax.set_mesh``, its
      ``jax.sharding.get_abstract_mesh()``); ``axis_name`` is the axis the sequence is split over (S must
      split into its layout there), ``batch_axes`` the mesh axes (a name or a tuple) the
      batch is split over, or None for a replicated batch, ``head_axes`` those the heads
      are split over (tensor parallelism: q and k/v heads must both divide; each device
      attends with its own heads, Ulysses splits them further over ``axis_name``), or None.
    strategy: "ring" | "zigzag" | "striped" | "ulysses" (see the module docstring).
    impl: the implementation computing each device's attention. The ring strategies run
      an implementation's chunk kernels (``registry.chunk_impls``): "xla" gives the XLA ones
      on every platform, "reference" the element-wise ones (memory O(L^2) per device;
      float64 throughout for float64 inputs under x64, the others accumulate in float32),
      "pallas_gpu" and "pallas_tpu" their Pallas kernels, which lower
      for their own backend only (elsewhere a ValueError, at once when called on arrays of
      another backend, at lowering under jit; ``interpret=True`` runs them on the CPU).
      "auto" is the Pallas implementation of the default backend (``jax.default_backend()``:
      pallas_gpu on a GPU, pallas_tpu on a TPU), else xla; to lower for another platform
      ahead of time, name the implementation. Ulysses runs the single-device op and takes
      every ``impl`` it takes (its "auto" decides at lowering).
    stripe: the stripe width of the "striped" strategy (tokens per stripe).
    ring_steps: with strategy "ring" and ``pruning``: visit only the device's own chunk and
      the ``ring_steps - 1`` chunks before it when ACP prunes every pair farther apart,
      which every device checks at run time from the chunk boundaries' c (a few floats
      gathered); when it does not, the rest of the ring runs (the exact result either
      way). Saves the transfers and the bookkeeping of the skipped steps; the compute of
      pruned chunks is skipped inside the kernels in any case. None: all P steps.
    sm_scale, pruning, block_sizes, interpret, return_stats: as for ``forgetting_attention``.

  Returns:
    o: [B, S, Hq, D] in q.dtype and the layout's order, and a
    :class:`SequenceParallelStats` if ``return_stats``.
  """
  q, k, v, log_fgate = (op_api._as_array(x, name) for x, name in
                        ((q, "q"), (k, "k"), (v, "v"), (log_fgate, "log_fgate")))
  if segment_ids is not None:
    segment_ids = op_api._as_array(op_api._host_segment_ids(segment_ids), "segment_ids")
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, got {strategy!r}")
  ring = strategy != "ulysses"
  if ring:
    chunks = registry.chunk_impls()
    if impl != "auto" and impl not in chunks:
      raise ValueError(f"impl={impl!r} has no chunk kernels for the {strategy!r} strategy; "
                       f"use one of {('auto',) + chunks} (or strategy='ulysses')")
  op_api._validate(q, k, v, log_fgate, segment_ids, impl, block_sizes, pruning)
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"q length {q.shape[1]} must equal k length {k.shape[1]}: a "
                     f"sequence-parallel op attends over the whole sharded sequence")
  interpret = op_api._check_flag(interpret, "interpret")
  return_stats = op_api._check_flag(return_stats, "return_stats")
  # As the single-device op: a Pallas impl called on arrays of another backend fails now.
  op_api._check_eager_backend(impl, interpret, (q, k, v, log_fgate))
  B, S, Hq, D = q.shape
  Hkv = k.shape[2]
  _check_mesh(mesh, axis_name, batch_axes, B, head_axes,
              ((Hq, "the q heads"), (Hkv, "the k/v heads")))
  heads_split = _axes_size(mesh, head_axes)
  num_shards = mesh.shape[axis_name]
  layout = strategy_layout(strategy, S, num_shards, stripe)
  scale = op_api._scale(sm_scale, D)
  if segment_ids is not None:
    segment_ids = op_api._int32_segment_ids(segment_ids)

  if ring_steps is not None:
    if strategy != "ring":
      raise ValueError(f"ring_steps applies to strategy='ring' only, got strategy={strategy!r}")
    if pruning is None:
      raise ValueError("ring_steps needs pruning: the chunks it skips are the ones ACP prunes")
    if (isinstance(ring_steps, (bool, np.bool_)) or not isinstance(ring_steps, (int, np.integer))
        or not 1 <= ring_steps <= num_shards):
      raise ValueError(f"ring_steps must be an integer in [1, {num_shards}] (the devices on "
                       f"{axis_name!r}), got {ring_steps!r}")
    ring_steps = int(ring_steps)
  if ring:
    name = _auto_chunk_impl() if impl == "auto" else impl
    bs = block_sizes or registry.default_block_sizes(name, D)
    batch_names = _names(batch_axes) + _names(head_axes)
    kernels = registry.module(name)
    if name in op_api._PLATFORMS and not interpret:
      kernels = _OnItsPlatform(name)
    cfg = ring_lib.RingConfig(layout, axis_name, scale, bs, kernels, interpret,
                              ring_steps, (axis_name,) + batch_names)
  else:
    ulysses_lib.check_heads(Hq // heads_split, Hkv // heads_split, num_shards)
    cfg = ulysses_lib.UlyssesConfig(axis_name, num_shards, scale, impl, block_sizes, interpret)

  def local(q, k, v, log_fgate, *seg):
    seg = seg[0] if seg else None
    delta = None if pruning is None else pruning_lib.threshold(
        q, k, pruning, scale, num_keys=S, axis_name=axis_name)
    if not ring:
      return ulysses_lib.ulysses_attention(q, k, v, log_fgate, seg, delta, cfg) + (
          jnp.int32(0),)
    # Zero gates: the single-device op's floor, from bounds over the whole sequence.
    log_fgate = common.floor_log_fgate(log_fgate, common.gate_floor(q, k, scale, axis_name))
    o, lse, kept, total, steps = ring_lib.ring_attention(q, k, v, log_fgate, seg, delta, cfg)
    return o, lse, lax.psum(kept, axis_name), lax.psum(total, axis_name), steps

  seq = P(batch_axes, axis_name, head_axes)
  args = (q, k, v, log_fgate) + (() if segment_ids is None else (segment_ids,))
  has_tiles = ring or impl != "reference"
  tiles_spec = P(batch_axes, head_axes) if has_tiles else None
  in_specs = (seq,) * 4 + (() if segment_ids is None else (P(batch_axes, axis_name),))
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                     out_specs=(seq, P(batch_axes, head_axes, axis_name), tiles_spec, tiles_spec,
                                P()),
                     check_vma=False)
  o, lse, kept, total, steps = fn(*args)
  if not return_stats:
    return o
  return o, SequenceParallelStats(lse, kept, total, steps)

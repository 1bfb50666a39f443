"""Device mesh and the one table that maps logical axis names onto it.

Model code names axes by meaning (parameters: 'vocab', 'embed', 'q_heads', ...;
activations: 'act_batch', 'act_length', ...). This module alone decides where each goes:

  data     pure data parallelism: parameters replicated, batch split
  fsdp     batch split AND parameters / optimizer state split along 'embed' (ZeRO-3 style)
  context  sequence split (activations' 'act_length')
  tensor   heads, MLP hidden units and vocabulary split (Megatron style)

A mesh shape of -1 on one axis means "all remaining devices".
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.linen import partitioning as nn_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or axes, or None = replicated). Parameters first, then
# activations. Batch is split over both data-parallel axes; the sequence over 'context'.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("act_batch", BATCH_AXES),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, context, tensor) with at most one -1 resolved to the rest."""
  extra = [a for a in axes if a not in MESH_AXES]
  if extra:
    raise ValueError(f"unknown mesh axes {extra}; the axes are {MESH_AXES}")
  sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
  rest = [i for i, s in enumerate(sizes) if s == -1]
  if len(rest) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if rest:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[rest[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all) with axes (data, fsdp, context, tensor).

  ``jax.make_mesh`` orders devices so that the last axes (tensor, context) fall on the
  fastest links (within a host or a slice), where their heavier traffic belongs.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axes, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _fit(spec: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from ``spec`` where the dimension does not divide evenly.

  Small models on big meshes (e.g. 4 kv heads on tensor=8) stay runnable: that
  dimension is replicated instead of raising.
  """
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    kept, size = [], 1
    for n in names:
      if dim % (size * mesh.shape[n]) == 0:
        kept.append(n)
        size *= mesh.shape[n]
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*out)


def logical_to_mesh_spec(logical: Sequence[Any] | None, shape: Sequence[int], mesh: Mesh,
                         rules=LOGICAL_RULES) -> P:
  """Mesh PartitionSpec of an array of ``shape`` whose axes have the ``logical`` names."""
  if logical is None:
    return P()
  table = dict(rules)
  mapped = [table.get(name) if isinstance(name, str) else None for name in logical]
  return _fit(mapped, shape, mesh)


def state_shardings(abstract_state: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for an nnx State (or any pytree of Variables / arrays).

  A Variable's logical names come from its ``out_sharding`` metadata
  (``nnx.with_partitioning``); plain arrays and unannotated Variables are replicated.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      logical = x.get_metadata().get("out_sharding")
      return x.replace(NamedSharding(mesh, logical_to_mesh_spec(logical, value.shape, mesh, rules)))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2, *, leading_unsharded: int = 0) -> NamedSharding:
  """Sharding of a token batch: [(A,) B, T] with B over (data, fsdp), T over context."""
  spec = (None,) * leading_unsharded + (BATCH_AXES, "context") + (None,) * (ndim - leading_unsharded - 2)
  return NamedSharding(mesh, P(*spec))


def batch_axes(mesh, batch: int) -> tuple[str, ...]:
  """The data-parallel axes (of ``BATCH_AXES``, size > 1) a batch of ``batch`` rows splits
  over inside ``shard_map``: each kept while the batch still divides, as 'act_batch' is
  placed; () when none (Mesh or AbstractMesh)."""
  kept, size = [], 1
  for name in BATCH_AXES:
    if name in mesh.axis_names and mesh.shape[name] > 1 and batch % (size * mesh.shape[name]) == 0:
      kept.append(name)
      size *= mesh.shape[name]
  return tuple(kept)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[None]:
  """Context in which the model's ``with_logical_constraint`` calls take effect."""
  with jax.set_mesh(mesh), nn_partitioning.axis_rules(rules):
    yield


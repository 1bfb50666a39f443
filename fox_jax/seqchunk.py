"""Token-wise layers computed in sequence chunks (the Mini-Sequence Transformer technique).

At long context the largest activations are those of layers that act on each token alone:
the LM head's float32 logits [B, T, V] (and the cross-entropy's softmax of them) and the
MLP's hidden [B, T, F]. :func:`map_chunks` computes such a layer ``seq_chunk`` tokens at a
time with ``lax.scan``, each step under ``jax.checkpoint``: the forward keeps only the
per-chunk outputs, and the backward recomputes one chunk's intermediates at a time from its
inputs, so no [B, T, V] or [B, T, F] array exists in either pass. The result is the same
math in another order of summation (parameter gradients are summed over chunks).

Context parallelism: the sequence axis T may be split over the mesh axis 'context' (S
shards, logical 'act_length'), each shard holding T / S consecutive tokens. A scan over
chunks of the global T would cut across shards, so T is viewed as [S, N, C] (S shards, N
chunks of C tokens each) and the scan runs over N: every step takes one chunk from every
shard, and the sharded S axis stays where it is. T must therefore be a multiple of S * C.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fox_jax.layers import constrain

CONTEXT_AXIS = "context"


def context_shards() -> int:
  """Size of the current mesh's 'context' axis; 1 without a mesh or without that axis."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or CONTEXT_AXIS not in mesh.axis_names:
    return 1
  return int(dict(zip(mesh.axis_names, mesh.axis_sizes))[CONTEXT_AXIS])


def chunk_layout(length: int, chunk: int) -> tuple[int, int]:
  """(S, N): context shards and chunks per shard for a sequence of ``length`` tokens.

  ValueError naming ``seq_chunk`` unless ``length`` is a multiple of S * ``chunk``.
  """
  shards = context_shards()
  if length % (shards * chunk):
    raise ValueError(f"seq_chunk: the sequence length {length} must be a multiple of seq_chunk "
                     f"({chunk}) x the mesh's '{CONTEXT_AXIS}' size ({shards})")
  return shards, length // (shards * chunk)


def map_chunks(fn: Callable[..., Any], modules: Any, xs: Sequence[jax.Array], *,
               chunk: int) -> Any:
  """``fn(modules, *xs)`` computed ``chunk`` tokens (per context shard) at a time.

  ``fn`` must act on each token independently: it maps arrays [B, L, ...] to a pytree of
  arrays [B, L, ...] for any L. ``modules`` (an nnx Module or a tuple of them) holds the
  parameters ``fn`` uses; they are passed into the scan explicitly, so their gradients
  accumulate over chunks and nothing else of the model enters the loop. ``xs`` are arrays
  [B, T, ...] with T sharded as 'act_length'. Returns ``fn``'s outputs [B, T, ...].
  """
  B, T = xs[0].shape[:2]
  S, N = chunk_layout(T, chunk)
  graphdef, state = nnx.split(modules)

  def split(x):  # [B, T, ...] -> [N, B, S, C, ...]; shard s keeps its own tokens
    rest = x.shape[2:]
    x = jnp.moveaxis(x.reshape(B, S, N, chunk, *rest), 2, 0)
    return constrain(x, (None, "act_batch", "act_length", None) + (None,) * len(rest))

  def merge(y):  # [N, B, S, C, ...] -> [B, T, ...]
    return jnp.moveaxis(y, 0, 2).reshape(B, T, *y.shape[4:])

  @functools.partial(jax.checkpoint, prevent_cse=False)  # no CSE to fear inside a scan
  def one_chunk(state, chunks):
    # [B, S, C, ...] -> [B, S * C, ...]: the token axis sharded as before, C per shard.
    flat = [constrain(c.reshape(B, S * chunk, *c.shape[3:]),
                      ("act_batch", "act_length") + (None,) * (c.ndim - 3)) for c in chunks]
    out = fn(nnx.merge(graphdef, state), *flat)
    return jax.tree.map(lambda y: y.reshape(B, S, chunk, *y.shape[2:]), out)

  _, ys = jax.lax.scan(lambda carry, chunks: (carry, one_chunk(state, chunks)), None,
                       tuple(split(x) for x in xs))
  return jax.tree.map(merge, ys)

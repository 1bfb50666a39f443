"""Building blocks: parameters with logical axes, RMSNorm, projections, SwiGLU, RoPE, ShiftLinear.

Every parameter carries logical axis names (``nnx.with_partitioning``) drawn from
{'vocab', 'embed', 'q_heads', 'kv_heads', 'head_dim', 'mlp', 'norm'}; ``fox_jax.sharding``
maps them to mesh axes. Parameters are created without eager sharding, so a model builds
with or without a mesh; ``nnx.get_partition_spec(nnx.state(model))`` gives the logical
specs to shard with (typically as ``out_shardings`` of a jitted init).

Activations are annotated with ``flax.linen.with_logical_constraint`` and names from
{'act_batch', 'act_length', 'act_embed', 'act_heads', 'act_kv_heads', 'act_head_dim',
'act_mlp', 'act_vocab'}: a no-op unless logical axis rules and a mesh are active.

Numerics: parameters are stored in ``param_dtype`` and cast to the compute ``dtype`` at use;
norms, gates and softmax statistics run in float32.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """Logical sharding constraint on an activation (no-op without rules and a mesh)."""
  return nn.with_logical_constraint(x, tuple(names))


def make_param(rngs: nnx.Rngs, init, shape, names, dtype) -> nnx.Param:
  """A parameter initialised by ``init`` and annotated with logical axis ``names``."""
  if len(shape) != len(names):
    raise ValueError(f"parameter shape {shape} and axis names {names} differ in rank")
  init = nnx.with_partitioning(init, tuple(names), eager_sharding=False)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype))


class Constant(nnx.Variable):
  """A non-trainable array that belongs to the model (e.g. the fixed forget-gate bias).

  Not an ``nnx.Param``, so optimisers built on ``nnx.Param`` leave it alone, but it is part
  of ``nnx.state(model)`` and therefore of checkpoints.
  """


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale over the last axis, computed in float32.

  ``shape`` is the scale's shape: (d,) for the residual stream, (head_dim,) for a scale
  shared across heads, (heads, head_dim) for one scale per head (x is then [..., H, D]).
  """

  def __init__(self, shape: Sequence[int], names: Sequence[str], *, eps: float, param_dtype,
               rngs: nnx.Rngs):
    self.eps = eps
    self.scale = make_param(rngs, nnx.initializers.ones, shape, names, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * inv * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Projection(nnx.Module):
  """A linear map with a kernel of arbitrary rank, applied with an einsum string.

  ``kernel`` has ``shape`` and logical axes ``names``; ``bias`` (optional) has the output
  axes (the kernel's trailing ``bias_rank`` axes) and starts at zero.
  """

  def __init__(self, shape: Sequence[int], names: Sequence[str], *, std: float, param_dtype,
               dtype, rngs: nnx.Rngs, bias_rank: int = 0):
    self.dtype = dtype
    self.kernel = make_param(rngs, nnx.initializers.normal(std), shape, names, param_dtype)
    self.bias = nnx.data(make_param(rngs, nnx.initializers.zeros, shape[-bias_rank:],
                                    names[-bias_rank:], param_dtype) if bias_rank else None)

  def __call__(self, x: jax.Array, equation: str, *, out_dtype=None) -> jax.Array:
    out_dtype = out_dtype or self.dtype
    y = jnp.einsum(equation, x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(out_dtype)


class Embed(nnx.Module):
  """Token embedding ``embedding`` [V, d]; ``attend`` gives tied logits."""

  def __init__(self, vocab_size: int, d_model: int, *, std: float, param_dtype, dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = make_param(rngs, nnx.initializers.normal(std), (vocab_size, d_model),
                                ("vocab", "embed"), param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    # The table is sharded ('vocab' -> tensor, 'embed' -> fsdp); a lookup straight from it
    # gives rows split along d over fsdp, which XLA cannot turn into the batch-split
    # activations without a full rematerialisation (an all-gather to every device, then a
    # slice; the same again for the gradient). Gathering 'embed' first, as FSDP does for
    # every other weight before use, leaves V / tensor rows per device: each tensor shard
    # looks up the ids in its vocabulary range and an all-reduce over tensor of the
    # [B, T, d] rows combines them (Megatron's vocab-parallel embedding). A one-hot matmul
    # would instead build [B, T, V], the very array long contexts cannot afford.
    table = constrain(self.embedding[...], ("vocab", None))
    return jnp.take(table, ids, axis=0).astype(self.dtype)  # [B, T, d]

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x.astype(self.dtype), self.embedding[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)


class SwiGLU(nnx.Module):
  """down(act(gate(x)) * up(x)); act is silu (SwiGLU) or sigmoid (GLU)."""

  def __init__(self, d_model: int, hidden: int, *, act: str, std: float, param_dtype, dtype,
               rngs: nnx.Rngs):
    kw = dict(std=std, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
    self.act = act
    self.gate_proj = Projection((d_model, hidden), ("embed", "mlp"), **kw)
    self.up_proj = Projection((d_model, hidden), ("embed", "mlp"), **kw)
    self.down_proj = Projection((hidden, d_model), ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = self.gate_proj(x, "btd,df->btf", out_dtype=jnp.float32)
    up = self.up_proj(x, "btd,df->btf", out_dtype=jnp.float32)
    act = jax.nn.silu(gate) if self.act == "silu" else jax.nn.sigmoid(gate)
    h = constrain(act * up, ("act_batch", "act_length", "act_mlp"))  # [B, T, F]
    return self.down_proj(h, "btf,fd->btd")


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding on [B, T, H, D] at integer ``positions`` [B, T].

  Non-interleaved (GPT-NeoX / flash-linear-attention layout): dimension i pairs with
  i + D/2 and rotates by positions * base^(-2i/D). Computed in float32.
  """
  D = x.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))  # [D/2]
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angle)[:, :, None, :]  # [B, T, 1, D/2]
  sin = jnp.sin(angle)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class ShiftLinear(nnx.Module):
  """KV-shift: a projection whose output mixes each token with the previous one, per head.

    y~_t = x_t W                  (``kernel`` [d, H, D])
    a_t  = sigmoid(x_t W_s)       (``shift_kernel`` [d, H], one mixing weight per head)
    y_t  = a_t y~_{t-1} + (1 - a_t) y~_t

  y~_{-1} is the carried ``state`` (the previous chunk's last y~, for cached decoding) or
  zero. With packed sequences the previous token of a document's first token is zero too,
  so a packed row computes exactly what each document would alone.
  """

  def __init__(self, d_model: int, heads: int, head_dim: int, head_axis: str, *, std: float,
               param_dtype, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = make_param(rngs, nnx.initializers.normal(std), (d_model, heads, head_dim),
                             ("embed", head_axis, "head_dim"), param_dtype)
    self.shift_kernel = make_param(rngs, nnx.initializers.normal(std), (d_model, heads),
                                   ("embed", head_axis), param_dtype)

  def __call__(self, x: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               state: Optional[jax.Array] = None,
               previous: Optional[Callable[[jax.Array], jax.Array]] = None
               ) -> tuple[jax.Array, jax.Array]:
    """x [B, T, d] -> (y [B, T, H, D], last unshifted y~ [B, H, D] for the next chunk).

    ``previous`` maps an array [B, T, ...] to each token's predecessor (zero at the first
    token): by default the array shifted by one along T; a sequence laid out over devices
    in another order passes its own (``fox_jax.context``), and then ``state`` must be None
    and the returned last y~ is that of the last token in the model's order.
    """
    cur = jnp.einsum("btd,dhk->bthk", x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                     preferred_element_type=jnp.float32).astype(self.dtype)  # [B, T, H, D]
    alpha = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x.astype(self.dtype),
                                      self.shift_kernel[...].astype(self.dtype),
                                      preferred_element_type=jnp.float32))  # [B, T, H]
    if previous is None:
      first = jnp.zeros_like(cur[:, :1]) if state is None else state[:, None].astype(cur.dtype)
      prev = jnp.concatenate([first, cur[:, :-1]], axis=1)  # [B, T, H, D]
      if segment_ids is not None:
        starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=bool),
                                  segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)  # [B, T]
    else:
      if state is not None:
        raise ValueError("ShiftLinear: state and previous cannot be given together")
      prev = previous(cur)
      if segment_ids is not None:
        starts = segment_ids != previous(segment_ids)  # position 0: prev is zero anyway
    if segment_ids is not None:
      prev = jnp.where(starts[:, :, None, None], jnp.zeros_like(prev), prev)
    a = alpha[..., None]
    y = a * prev.astype(jnp.float32) + (1.0 - a) * cur.astype(jnp.float32)
    return y.astype(self.dtype), cur[:, -1]

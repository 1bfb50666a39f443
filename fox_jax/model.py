"""Decoder LM for FoX and Transformer (LLaMA and Pro blocks), in Flax NNX.

Why NNX: the modules are plain Python objects holding their parameters, so researchers can
import a layer (``ForgettingAttention``, ``ShiftLinear``, ``RMSNorm``) into their own model
and call it without threading variable collections; cached decoding walks the blocks and
calls their pieces directly (``attn.qkv``, ``attn.output``); checkpoint import assigns
arrays to named attributes; and ``nnx.split`` / ``nnx.merge`` still give a pure
(graphdef, state) pair for ``jax.jit``, sharding and orbax.

Block (pre-norm, as in the authors' code):

    h = x + attn(attn_norm(x))
    y = h + mlp(mlp_norm(h))

With ``cfg.seq_chunk`` the MLP, and the LM head with the cross-entropy of
:meth:`DecoderLM.token_losses`, run in sequence chunks (``fox_jax.seqchunk``).

Parameter tree (``nnx.state(model, nnx.Param)``; L layers, V vocab, d model width,
Hq / Hkv query / key-value heads, D head dim, F MLP width; logical axes in brackets):

    embed.embedding                      [V, d]        (vocab, embed)
    layers[i].attn_norm.scale            [d]           (norm)
    layers[i].attn.q_proj.kernel         [d, Hq, D]    (embed, q_heads, head_dim)
    layers[i].attn.k_proj.kernel         [d, Hkv, D]   (embed, kv_heads, head_dim)
    layers[i].attn.k_proj.shift_kernel   [d, Hkv]      (embed, kv_heads)        KV-shift only
    layers[i].attn.v_proj.kernel         [d, Hkv, D]   (embed, kv_heads, head_dim)
    layers[i].attn.v_proj.shift_kernel   [d, Hkv]      (embed, kv_heads)        KV-shift only
    layers[i].attn.fgate_proj.kernel     [d, Hq]       (embed, q_heads)         gate 'full'
    layers[i].attn.fgate_proj.bias       [Hq]          (q_heads)                gate 'full'
    layers[i].attn.fgate_bias            [Hq]          (q_heads)    gate 'bias_only' ('fixed':
                                                                    a non-trainable Constant)
    layers[i].attn.q_norm.scale          [D] shared or [Hq, D]  (head_dim) / (q_heads, head_dim)
    layers[i].attn.k_norm.scale          [D] shared or [Hkv, D] (head_dim) / (kv_heads, head_dim)
    layers[i].attn.output_norm.scale     [Hq, D]       (q_heads, head_dim)      output norm
    layers[i].attn.ogate_proj.kernel     [d, Hq, D]    (embed, q_heads, head_dim) output gate
    layers[i].attn.o_proj.kernel         [Hq, D, d]    (q_heads, head_dim, embed)
    layers[i].mlp_norm.scale             [d]           (norm)
    layers[i].mlp.gate_proj.kernel       [d, F]        (embed, mlp)
    layers[i].mlp.up_proj.kernel         [d, F]        (embed, mlp)
    layers[i].mlp.down_proj.kernel       [F, d]        (mlp, embed)
    final_norm.scale                     [d]           (norm)
    lm_head.kernel                       [d, V]        (embed, vocab)   untied embeddings only

Kernels map inputs to outputs (x @ kernel), i.e. they are the transposes of PyTorch
``nn.Linear.weight`` reshaped per head. Parameter paths are stable.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fox_jax import context as context_lib
from fox_jax.attention import ForgettingAttention, default_positions
from fox_jax.config import ModelConfig
from fox_jax.layers import Embed, Projection, RMSNorm, SwiGLU, constrain
from fox_jax.seqchunk import map_chunks

EMBED_AXES = ("act_batch", "act_length", "act_embed")


class Block(nnx.Module):
  """Pre-norm residual block: forgetting attention, then a SwiGLU MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd, cd = cfg.params_dtype, cfg.compute_dtype
    self.attn_norm = RMSNorm((cfg.d_model,), ("norm",), eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = ForgettingAttention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm((cfg.d_model,), ("norm",), eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    self.mlp = SwiGLU(cfg.d_model, cfg.mlp_width, act=cfg.mlp_act, std=cfg.init_std,
                      param_dtype=pd, dtype=cd, rngs=rngs)
    self.seq_chunk = cfg.seq_chunk

  def mlp_residual(self, x: jax.Array, *, seq_chunk: Optional[int] = None) -> jax.Array:
    """x + mlp(mlp_norm(x)) for x [B, T, d]; with ``seq_chunk``, seq_chunk tokens (per
    context shard) at a time, so the [B, T, F] hidden is never whole (``fox_jax.seqchunk``).

    The block's forward passes ``cfg.seq_chunk``; cached decoding calls it unchunked, so
    prompts of any length work.
    """
    if seq_chunk is None:
      return constrain(x + _mlp_residual((self.mlp_norm, self.mlp), x), EMBED_AXES)
    y = map_chunks(_mlp_residual, (self.mlp_norm, self.mlp), (x,), chunk=seq_chunk)
    return constrain(x + y, EMBED_AXES)

  def __call__(self, x: jax.Array, *, segment_ids: Optional[jax.Array],
               positions: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), segment_ids=segment_ids, positions=positions)
    return self.mlp_residual(constrain(x, EMBED_AXES), seq_chunk=self.seq_chunk)


def _mlp_residual(modules, x: jax.Array) -> jax.Array:
  norm, mlp = modules
  return mlp(norm(x))


def _logits(modules, x: jax.Array) -> jax.Array:
  """Final norm and output projection (an untied head or the tied embedding's ``attend``):
  x [B, T, d] -> float32 logits [B, T, V]."""
  norm, head = modules
  x = norm(x)
  if isinstance(head, Embed):
    out = head.attend(x)
  else:
    out = head(x, "btd,dv->btv", out_dtype=jnp.float32)
  return constrain(out, ("act_batch", "act_length", "act_vocab"))


def _token_losses(modules, x: jax.Array, targets: jax.Array) -> jax.Array:
  return cross_entropy(_logits(modules, x), targets)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy [B, T] float32 of logits [B, T, V] against targets [B, T]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _block_forward(block: Block, x, segment_ids, positions):
  return block(x, segment_ids=segment_ids, positions=positions)


class DecoderLM(nnx.Module):
  """Token ids -> next-token logits. See the module docstring for the parameter tree."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd, cd = cfg.params_dtype, cfg.compute_dtype
    self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, param_dtype=pd, dtype=cd,
                       rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm((cfg.d_model,), ("norm",), eps=cfg.norm_eps, param_dtype=pd,
                              rngs=rngs)
    self.lm_head = nnx.data(None if cfg.tie_embeddings else Projection(
        (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std, param_dtype=pd,
        dtype=cd, rngs=rngs))

  @property
  def _head(self):
    """(final norm, output head): the untied lm_head or the tied embedding."""
    return (self.final_norm, self.embed if self.lm_head is None else self.lm_head)

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and output projection: x [B, T, d] -> float32 logits [B, T, V]."""
    return _logits(self._head, x)

  def hidden(self, input_ids: jax.Array, *, segment_ids: Optional[jax.Array] = None,
             positions: Optional[jax.Array] = None) -> jax.Array:
    """input_ids [B, T] int -> the last block's output [B, T, d] (before the final norm).

    segment_ids [B, T]: packed documents; no attention (and no KV-shift) across them.
    positions [B, T]: RoPE positions; default: index within each segment.

    Under a mesh whose 'context' axis has size P > 1 (context parallelism, see
    ``fox_jax.context``) every [B, T] array, inputs and logits, is in the layout order of
    ``cfg.context_strategy``: permute natural-order inputs with
    ``context.active(cfg, B, T).permute`` (the training step does it where the batch enters).
    """
    B, T = input_ids.shape
    if positions is None:
      positions = default_positions(B, T, segment_ids, context_lib.active(self.cfg, B, T))
    x = constrain(self.embed(input_ids), EMBED_AXES)  # [B, T, d]
    forward = nnx.remat(_block_forward) if self.cfg.remat else _block_forward
    for block in self.layers:
      x = forward(block, x, segment_ids, positions)
    return x

  def __call__(self, input_ids: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """input_ids [B, T] int -> logits [B, T, V] float32 (see :meth:`hidden`)."""
    return self.logits(self.hidden(input_ids, segment_ids=segment_ids, positions=positions))

  def token_losses(self, input_ids: jax.Array, targets: jax.Array, *,
                   segment_ids: Optional[jax.Array] = None,
                   positions: Optional[jax.Array] = None) -> jax.Array:
    """Per-token cross-entropy [B, T] float32 of the next-token logits against ``targets``.

    With ``cfg.seq_chunk`` the LM head and the cross-entropy run together chunk by chunk,
    rematerialised in the backward pass, so the [B, T, V] logits never exist; without it,
    this is ``cross_entropy(self(input_ids, ...), targets)``.
    """
    x = self.hidden(input_ids, segment_ids=segment_ids, positions=positions)
    if self.cfg.seq_chunk is None:
      return _token_losses(self._head, x, targets)
    return map_chunks(_token_losses, self._head, (x, targets), chunk=self.cfg.seq_chunk)


def count_params(model_or_state, *, exclude_embedding: bool = False) -> int:
  """Number of parameters of a model or its ``nnx.Param`` state.

  Works on ``nnx.eval_shape`` results, so paper-sized models are counted without allocating
  them. With ``exclude_embedding`` the input embedding table is left out, as in the FoX
  paper's "non-embedding" counts (an untied output head is counted).
  """
  state = model_or_state
  if isinstance(state, nnx.Module):
    state = nnx.state(state, nnx.Param)
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    keys = [getattr(k, "key", None) for k in path]
    if exclude_embedding and keys[:2] == ["embed", "embedding"]:
      continue
    total += math.prod(leaf.shape)
  return total

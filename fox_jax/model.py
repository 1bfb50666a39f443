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
from flax import nnx

from fox_jax import context as context_lib
from fox_jax.attention import ForgettingAttention, default_positions
from fox_jax.config import ModelConfig
from fox_jax.layers import Embed, Projection, RMSNorm, SwiGLU, constrain

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

  def mlp_residual(self, x: jax.Array) -> jax.Array:
    return constrain(x + self.mlp(self.mlp_norm(x)), EMBED_AXES)

  def __call__(self, x: jax.Array, *, segment_ids: Optional[jax.Array],
               positions: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), segment_ids=segment_ids, positions=positions)
    return self.mlp_residual(constrain(x, EMBED_AXES))


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

  def logits(self, x: jax.Array) -> jax.Array:
    """Final norm and output projection: x [B, T, d] -> float32 logits [B, T, V]."""
    x = self.final_norm(x)
    if self.lm_head is None:
      out = self.embed.attend(x)
    else:
      out = self.lm_head(x, "btd,dv->btv", out_dtype=jnp.float32)
    return constrain(out, ("act_batch", "act_length", "act_vocab"))

  def __call__(self, input_ids: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """input_ids [B, T] int -> logits [B, T, V] float32.

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
    return self.logits(x)


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

"""The Forgetting Attention layer (FoX) and its Transformer special cases.

One module covers the LLaMA and Pro blocks of both families:

  x [B, T, d] (already RMS-normalised by the block)
    q = x Wq, k = x Wk, v = x Wv                     (KV-shift mixes k, v with the previous token)
    QK-norm: per-head RMSNorm on q and k              (scale shared across heads or per head)
    RoPE on q and k                                   (Transformer baselines)
    log f = log_sigmoid(x Wf + bf)                    ('full'; 'bias_only' / 'fixed': bf only;
                                                       'none': 0, i.e. plain causal attention)
    o = forgetting_attention(q, k, v, log f)          (pallas_kernels; impl / pruning from config;
                                                       'none': plain_attention, the backend's
                                                       causal kernel, cfg.plain_attn_impl)
    output norm: per-head RMSNorm on o; output gate: o * sigmoid(x Wg)
    out = o Wo

The order of these steps follows the authors' implementation, so that their checkpoints load
unchanged (fox_jax.convert). ``qkv`` and ``output`` are exposed separately because cached
decoding (fox_jax.decode) replaces only the attention in the middle.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fox_jax import context as context_lib
from fox_jax.config import ModelConfig
from fox_jax.layers import Constant, Projection, RMSNorm, ShiftLinear, apply_rope, constrain
from pallas_kernels.forgetting_attention.api import forgetting_attention
from pallas_kernels.forgetting_attention.plain import plain_attention

Q_AXES = ("act_batch", "act_length", "act_heads", "act_head_dim")
KV_AXES = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")


def decay_time_bias(num_heads: int, t_min: float, t_max: float) -> np.ndarray:
  """Gate biases b with decay times -1 / log sigmoid(b) log-spaced in [t_min, t_max], [H]."""
  decay_time = np.exp(np.linspace(math.log(t_min), math.log(t_max), num_heads))
  return (-np.log(np.expm1(1.0 / decay_time))).astype(np.float32)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Position of each token inside its packed document, [B, T] int32 (0 at each start)."""
  T = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


class ForgettingAttention(nnx.Module):
  """Forgetting attention with the FoX (Pro) options; see the module docstring.

  Parameters (Hq = num_heads, Hkv = num_kv_heads, D = head_dim, d = d_model):
    q_proj.kernel [d, Hq, D]; k_proj.kernel, v_proj.kernel [d, Hkv, D]
    k_proj.shift_kernel, v_proj.shift_kernel [d, Hkv]            (KV-shift)
    fgate_proj.kernel [d, Hq], fgate_proj.bias [Hq]               (forget gate 'full')
    fgate_bias [Hq]                                               ('bias_only': Param;
                                                                   'fixed': Constant)
    q_norm.scale, k_norm.scale [D] (shared) or [Hq, D] / [Hkv, D] (QK-norm)
    output_norm.scale [Hq, D]; ogate_proj.kernel [d, Hq, D]       (output norm / gate)
    o_proj.kernel [Hq, D, d]
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, Hq, Hkv, D = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd, cd = cfg.params_dtype, cfg.compute_dtype
    kw = dict(std=cfg.init_std, param_dtype=pd, dtype=cd, rngs=rngs)
    self.q_proj = Projection((d, Hq, D), ("embed", "q_heads", "head_dim"), **kw)
    self.k_proj = (ShiftLinear(d, Hkv, D, "kv_heads", **kw) if cfg.k_shift else
                   Projection((d, Hkv, D), ("embed", "kv_heads", "head_dim"), **kw))
    self.v_proj = (ShiftLinear(d, Hkv, D, "kv_heads", **kw) if cfg.v_shift else
                   Projection((d, Hkv, D), ("embed", "kv_heads", "head_dim"), **kw))
    self.o_proj = Projection((Hq, D, d), ("q_heads", "head_dim", "embed"), **kw)

    fgate_proj = fgate_bias = None
    if cfg.forget_gate == "full":
      # Bias 0 at init: f ~ 0.5 for every head, as the authors initialise.
      fgate_proj = Projection((d, Hq), ("embed", "q_heads"), bias_rank=1, **kw)
    elif cfg.forget_gate in ("bias_only", "fixed"):
      if cfg.decay_time_min is None:
        bias = np.zeros((Hq,), np.float32)
      else:
        bias = decay_time_bias(Hq, cfg.decay_time_min, cfg.decay_time_max)
      init = lambda key, shape, dtype: jnp.asarray(bias, dtype)
      init = nnx.with_partitioning(init, ("q_heads",), eager_sharding=False)
      var_type = nnx.Param if cfg.forget_gate == "bias_only" else Constant
      fgate_bias = var_type(init(None, (Hq,), pd))
    self.fgate_proj = nnx.data(fgate_proj)
    self.fgate_bias = nnx.data(fgate_bias)

    q_norm = k_norm = output_norm = ogate_proj = None
    nkw = dict(eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    qkw = dict(nkw, eps=cfg.qk_norm_eps)
    if cfg.qk_norm and cfg.qk_norm_shared_across_heads:
      q_norm = RMSNorm((D,), ("head_dim",), **qkw)
      k_norm = RMSNorm((D,), ("head_dim",), **qkw)
    elif cfg.qk_norm:
      q_norm = RMSNorm((Hq, D), ("q_heads", "head_dim"), **qkw)
      k_norm = RMSNorm((Hkv, D), ("kv_heads", "head_dim"), **qkw)
    if cfg.output_norm:
      output_norm = RMSNorm((Hq, D), ("q_heads", "head_dim"), eps=cfg.norm_eps, param_dtype=pd,
                            rngs=rngs)
    if cfg.output_gate:
      ogate_proj = Projection((d, Hq, D), ("embed", "q_heads", "head_dim"), **kw)
    self.q_norm = nnx.data(q_norm)
    self.k_norm = nnx.data(k_norm)
    self.output_norm = nnx.data(output_norm)
    self.ogate_proj = nnx.data(ogate_proj)

  def log_forget_gate(self, x: jax.Array) -> jax.Array:
    """log f [B, T, Hq] float32 (zeros for forget gate 'none')."""
    cfg = self.cfg
    B, T, _ = x.shape
    if cfg.forget_gate == "full":
      logits = self.fgate_proj(x, "btd,dh->bth", out_dtype=jnp.float32)
    elif cfg.forget_gate in ("bias_only", "fixed"):
      bias = self.fgate_bias[...].astype(jnp.float32)
      logits = jnp.broadcast_to(bias, (B, T, cfg.num_heads))
    else:
      return jnp.zeros((B, T, cfg.num_heads), jnp.float32)
    return jax.nn.log_sigmoid(logits)

  def _project(self, proj, x, segment_ids, state, context):
    if isinstance(proj, ShiftLinear):
      previous = None if context is None else context.previous
      return proj(x, segment_ids=segment_ids, state=state, previous=previous)
    return proj(x, "btd,dhk->bthk"), None

  def qkv(self, x: jax.Array, *, positions: jax.Array, segment_ids: Optional[jax.Array] = None,
          shift_state: Optional[tuple] = None,
          context: Optional[context_lib.ContextParallel] = None):
    """Projections of a normalised input x [B, T, d].

    Returns q [B, T, Hq, D], k, v [B, T, Hkv, D] (compute dtype), log f [B, T, Hq] float32
    and the KV-shift state to carry (last unshifted k, v, each [B, Hkv, D] or None).
    With ``context`` the tokens are in its layout's order, and the KV-shift takes each
    token's predecessor from the device holding it.
    """
    k_state, v_state = shift_state if shift_state is not None else (None, None)
    q = self.q_proj(x, "btd,dhk->bthk")
    k, k_last = self._project(self.k_proj, x, segment_ids, k_state, context)
    v, v_last = self._project(self.v_proj, x, segment_ids, v_state, context)
    if self.q_norm is not None:
      q = self.q_norm(q)
      k = self.k_norm(k)
    if self.cfg.rope:
      q = apply_rope(q, positions, self.cfg.rope_base)
      k = apply_rope(k, positions, self.cfg.rope_base)
    q = constrain(q, Q_AXES)
    k = constrain(k, KV_AXES)
    v = constrain(v, KV_AXES)
    return q, k, v, self.log_forget_gate(x), (k_last, v_last)

  def output(self, o: jax.Array, x: jax.Array) -> jax.Array:
    """Output norm, output gate and projection: o [B, T, Hq, D], x [B, T, d] -> [B, T, d]."""
    if self.output_norm is not None:
      o = self.output_norm(o)
    if self.ogate_proj is not None:
      g = self.ogate_proj(x, "btd,dhk->bthk", out_dtype=jnp.float32)
      act = jax.nn.sigmoid(g) if self.cfg.output_gate_act == "sigmoid" else jax.nn.silu(g)
      o = (o.astype(jnp.float32) * act).astype(o.dtype)
    return self.o_proj(o, "bthk,hkd->btd")

  def attend(self, q, k, v, log_fgate, segment_ids=None,
             context: Optional[context_lib.ContextParallel] = None) -> jax.Array:
    """The parallel op (with ``context``, its sequence-parallel form over the 'context'
    axis); with pruning, sows (kept, total) forward tiles as 'attention_tiles'.

    Forget gate 'none' without ``context``: plain causal attention (``cfg.plain_attn_impl``,
    unless "forgetting"), which has no decay to prune and reports no tiles."""
    cfg = self.cfg
    if context is None and cfg.forget_gate == "none" and cfg.plain_attn_impl != "forgetting":
      return plain_attention(q, k, v, segment_ids=segment_ids, impl=cfg.plain_attn_impl)
    kw = dict(segment_ids=segment_ids, pruning=cfg.pruning, impl=cfg.attn_impl,
              block_sizes=cfg.block_sizes)
    op = forgetting_attention if context is None else context.attention
    if cfg.pruning is None:
      return op(q, k, v, log_fgate, **kw)
    o, stats = op(q, k, v, log_fgate, return_stats=True, **kw)
    if stats.kept_tiles is not None:
      kept = jnp.sum(stats.kept_tiles).astype(jnp.int32)
      total = jnp.sum(stats.total_tiles).astype(jnp.int32)
      self.sow(nnx.Intermediate, "attention_tiles", (kept, total))
    return o

  def __call__(self, x: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """x [B, T, d] -> [B, T, d].

    Under a mesh with a 'context' axis of size > 1 the tokens are in the layout order of
    ``cfg.context_strategy`` (``fox_jax.context``), and so is the output.
    """
    B, T = x.shape[:2]
    context = context_lib.active(self.cfg, B, T)
    if positions is None:
      positions = default_positions(B, T, segment_ids, context)
    q, k, v, log_fgate, _ = self.qkv(x, positions=positions, segment_ids=segment_ids,
                                     context=context)
    o = self.attend(q, k, v, log_fgate, segment_ids, context)  # [B, T, Hq, D]
    o = constrain(o, Q_AXES)
    return self.output(o, x)


def default_positions(B: int, T: int, segment_ids: Optional[jax.Array],
                      context: Optional[context_lib.ContextParallel] = None) -> jax.Array:
  """RoPE positions [B, T]: the index within each packed document, or 0..T-1 without segments.

  With ``context``, ``segment_ids`` and the result are in its layout's order.
  """
  if context is not None:
    natural = None if segment_ids is None else context.unpermute(segment_ids)
    return context.permute(default_positions(B, T, natural))
  if segment_ids is not None:
    return segment_positions(segment_ids)
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

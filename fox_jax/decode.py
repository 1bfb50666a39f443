"""Cached decoding: prefill with the parallel op, then one token at a time in O(cached length).

The cache of each layer holds, for every position s < max_len:

  k, v      [B, S, Hkv, D]   keys and values (compute dtype)
  log_f     [B, S, Hq]       log forget gates (float32), for the parallel op in ``prefill``
  c_hi, c_lo [B, S, Hq]      the cumulative log forget gate c_s as a double-float pair

plus the running c of the last cached position (``c_run_hi``, ``c_run_lo`` [B, Hq]) and the
KV-shift state (the last unshifted k and v, [B, Hkv, D]). A new token's c is the running c
plus its log f, added with TwoSum, so c is never recomputed and keeps ~2^-48 relative
precision however long the cache grows; the decay to each cached key is then
D_ts = (c_hi_t - c_hi_s) + (c_lo_t - c_lo_s), exact in its leading digits for nearby tokens.

``prefill`` appends T tokens to a cache holding L (L may be 0) with the parallel
``forgetting_attention`` (queries = the last T of S = L + T keys): the buffer is rolled so
that the new tokens come last, and unused slots get another segment id, so the op never
attends to them. ``decode_step`` appends one token: a dot with every cached key, O(max_len).
``generate`` runs both under ``jax.jit`` with greedy or temperature / top-k sampling.
ACP pruning, when configured, applies to the prefill; a step attends to every cached key.

All rows of a batch share one length (prompts of equal length).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from fox_jax.attention import Q_AXES
from fox_jax.config import ModelConfig
from fox_jax.layers import constrain
from fox_jax.model import DecoderLM
from pallas_kernels.forgetting_attention.api import forgetting_attention
from pallas_kernels.forgetting_attention.common import add_pairs, compensated_cumsum


class LayerCache(NamedTuple):
  k: jax.Array          # [B, S, Hkv, D]
  v: jax.Array          # [B, S, Hkv, D]
  log_f: jax.Array      # [B, S, Hq] float32
  c_hi: jax.Array       # [B, S, Hq] float32
  c_lo: jax.Array       # [B, S, Hq] float32
  c_run_hi: jax.Array   # [B, Hq] float32: c at the last cached position (0 when empty)
  c_run_lo: jax.Array   # [B, Hq] float32
  k_shift: Optional[jax.Array]  # [B, Hkv, D] last unshifted key (KV-shift only)
  v_shift: Optional[jax.Array]  # [B, Hkv, D] last unshifted value


class Cache(NamedTuple):
  layers: tuple[LayerCache, ...]
  length: jax.Array  # [] int32: number of cached positions

  @property
  def max_len(self) -> int:
    return self.layers[0].k.shape[1]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Cache:
  """An empty cache for ``max_len`` positions."""
  B, S, Hq, Hkv, D = batch_size, max_len, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  dt = cfg.compute_dtype
  f32 = lambda *shape: jnp.zeros(shape, jnp.float32)
  shift = lambda on: jnp.zeros((B, Hkv, D), dt) if on else None
  layer = lambda: LayerCache(
      k=jnp.zeros((B, S, Hkv, D), dt), v=jnp.zeros((B, S, Hkv, D), dt), log_f=f32(B, S, Hq),
      c_hi=f32(B, S, Hq), c_lo=f32(B, S, Hq), c_run_hi=f32(B, Hq), c_run_lo=f32(B, Hq),
      k_shift=shift(cfg.k_shift), v_shift=shift(cfg.v_shift))
  return Cache(tuple(layer() for _ in range(cfg.num_layers)), jnp.zeros((), jnp.int32))


def _write(buf, new, index):
  """buf[:, index:index + T] = new (buf [B, S, ...], new [B, T, ...])."""
  start = (0, index) + (0,) * (buf.ndim - 2)
  return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)


def _append(lc: LayerCache, k, v, log_f, shift, index) -> LayerCache:
  """Writes T new positions at ``index``; their c is the running c plus their prefix sums."""
  p_hi, p_lo = compensated_cumsum(log_f, axis=1)  # [B, T, Hq]
  c_hi, c_lo = add_pairs(lc.c_run_hi[:, None], lc.c_run_lo[:, None], p_hi, p_lo)
  k_last, v_last = shift
  return LayerCache(
      k=_write(lc.k, k, index), v=_write(lc.v, v, index), log_f=_write(lc.log_f, log_f, index),
      c_hi=_write(lc.c_hi, c_hi, index), c_lo=_write(lc.c_lo, c_lo, index),
      c_run_hi=c_hi[:, -1], c_run_lo=c_lo[:, -1],
      k_shift=None if k_last is None else k_last.astype(lc.k_shift.dtype),
      v_shift=None if v_last is None else v_last.astype(lc.v_shift.dtype))


def _prefill_attention(cfg: ModelConfig, q, lc: LayerCache, end):
  """The parallel op over the whole buffer rolled so that positions [0, end) come last."""
  S = lc.k.shape[1]
  shift = S - end
  roll = lambda x: jnp.roll(x, shift, axis=1)
  valid = roll(jnp.broadcast_to(jnp.arange(S) < end, (q.shape[0], S)))  # [B, S]
  segment_ids = jnp.where(valid, 0, 1).astype(jnp.int32)
  log_f = jnp.where(valid[:, :, None], roll(lc.log_f), 0.0)
  return forgetting_attention(q, roll(lc.k), roll(lc.v), log_f, segment_ids=segment_ids,
                              pruning=cfg.pruning, impl=cfg.attn_impl,
                              block_sizes=cfg.block_sizes)


def _step_attention(q, lc: LayerCache, index):
  """One query [B, 1, Hq, D] at position ``index`` against the cached keys [0, index]."""
  B, _, Hq, D = q.shape
  S, Hkv = lc.k.shape[1], lc.k.shape[2]
  G = Hq // Hkv
  qg = q[:, 0].reshape(B, Hkv, G, D)
  scores = jnp.einsum("bhgd,bshd->bhgs", qg, lc.k, preferred_element_type=jnp.float32)
  # D_ts = c_t - c_s with c_t the running c (the new token is already appended).
  decay = (lc.c_run_hi[:, None] - lc.c_hi) + (lc.c_run_lo[:, None] - lc.c_lo)  # [B, S, Hq]
  decay = decay.transpose(0, 2, 1).reshape(B, Hkv, G, S)
  logits = scores * (D ** -0.5) + decay
  logits = jnp.where(jnp.arange(S) <= index, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bhgs,bshd->bhgd", p.astype(lc.v.dtype), lc.v,
                 preferred_element_type=jnp.float32)
  return o.reshape(B, 1, Hq, D).astype(q.dtype)


def _run(model: DecoderLM, ids, cache: Cache, attention):
  """Shared body of prefill and decode_step: the model's blocks with cached attention."""
  B, T = ids.shape
  index = cache.length
  positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
  x = model.embed(ids)  # [B, T, d]
  layers = []
  for block, lc in zip(model.layers, cache.layers):
    h = block.attn_norm(x)
    q, k, v, log_f, shift = block.attn.qkv(h, positions=positions,
                                           shift_state=(lc.k_shift, lc.v_shift))
    lc = _append(lc, k, v, log_f, shift, index)
    o = constrain(attention(q, lc), Q_AXES)
    x = x + block.attn.output(o, h)
    x = block.mlp_residual(x)
    layers.append(lc)
  return model.logits(x), Cache(tuple(layers), index + T)


def prefill(model: DecoderLM, ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """Appends ``ids`` [B, T] to ``cache`` with the parallel op; logits [B, T, V] float32.

  The cache must have room: length + T <= max_len.
  """
  end = cache.length + ids.shape[1]
  return _run(model, ids, cache, lambda q, lc: _prefill_attention(model.cfg, q, lc, end))


def decode_step(model: DecoderLM, ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """Appends one token per row, ``ids`` [B]; returns its logits [B, V] float32."""
  index = cache.length
  logits, cache = _run(model, ids[:, None], cache,
                       lambda q, lc: _step_attention(q, lc, index))
  return logits[:, 0], cache


def sample(logits: jax.Array, rng: jax.Array, temperature: float, top_k: Optional[int]) -> jax.Array:
  """Next tokens [B] from logits [B, V]: greedy when temperature == 0."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: DecoderLM, prompt_ids: jax.Array, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: Optional[int] = None,
             rng: Optional[jax.Array] = None) -> jax.Array:
  """Prompt [B, P] -> [B, P + max_new_tokens]: prefill, then ``decode_step`` under ``jit``.

  temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted
  to the ``top_k`` most likely tokens when given. ``rng`` is required when sampling.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= model.cfg.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
  if temperature > 0 and rng is None:
    raise ValueError("rng is required when temperature > 0")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  new = _generate(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), rng, max_new_tokens,
                  float(temperature), top_k)
  return jnp.concatenate([prompt_ids.astype(jnp.int32), new], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, state, prompt, rng, max_new_tokens, temperature, top_k):
  model = nnx.merge(graphdef, state)
  B, P = prompt.shape
  cache = init_cache(model.cfg, B, P + max_new_tokens)
  logits, cache = prefill(model, prompt, cache)
  keys = jax.random.split(rng, max_new_tokens)
  first = sample(logits[:, -1], keys[0], temperature, top_k)

  def body(carry, key):
    tok, cache = carry
    logits, cache = decode_step(model, tok, cache)
    nxt = sample(logits, key, temperature, top_k)
    return (nxt, cache), tok

  (last, _), toks = jax.lax.scan(body, (first, cache), keys[1:])
  return jnp.concatenate([toks.T, last[:, None]], axis=1)  # [B, max_new_tokens]

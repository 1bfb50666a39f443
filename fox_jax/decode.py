"""Cached decoding: prefill with the parallel op, then one token at a time in O(cached length).

The cache of each layer holds, for every position s < max_len:

  k, v      [B, S, Hkv, D]   keys and values (compute dtype)
  log_f     [B, S, Hq]       log forget gates (float32), for the parallel op in ``prefill``
                             (single-device caches only; None in a sequence-sharded cache)
  c_hi, c_lo [B, S, Hq]      the cumulative log forget gate c_s as a double-float pair

plus the running c of the last cached position (``c_run_hi``, ``c_run_lo`` [B, Hq]), the
cached key of largest norm (``k_top`` [B, Hkv, D], for the ACP bound of a step) and the
KV-shift state (the last unshifted k and v, [B, Hkv, D]). A new token's c is the running c
plus its log f, added with TwoSum, so c is never recomputed and keeps ~2^-48 relative
precision however long the cache grows; the decay to each cached key is then
D_ts = (c_hi_t - c_hi_s) + (c_lo_t - c_lo_s), exact in its leading digits for nearby tokens.

Zero gates. The c in the cache floors log f at ``GATE_FLOOR`` (-2^16): a zero gate (log f =
-inf) or a finite one below the floor enters c as -2^16, so a pair across it has a weight
below exp(2U - 2^16), exactly 0 in float32 for any |scale q.k| <= U < 32000, which is what
the parallel op gives there (it floors at -(2U + 128), ``common.gate_floor``); without the
floor c would be -inf and every later step NaN. NaN gates stay NaN, as in the parallel op.

``prefill`` appends T tokens to a cache holding L (L may be 0) with the parallel
``forgetting_attention`` (queries = the last T of S = L + T keys): the buffer is rolled so
that the new tokens come last, and unused slots get another segment id, so the op never
attends to them. ``decode_step`` appends one token: a dot with every cached key, O(max_len).
``generate`` runs both under ``jax.jit`` with greedy or temperature / top-k sampling.
ACP pruning, when configured, applies to the prefill (the op's threshold) and to every step:
a step drops the pairs with D < delta, delta = log_eps - 2U - log(max_len) with U from the
step's queries and the cached key of largest norm (``pruning.threshold`` on ``k_top``), which
is the bound over every cached key.

Sequence-sharded caches (Tree Attention). ``init_cache(..., mesh=mesh)`` with a mesh whose
"context" axis has P > 1 devices splits k, v, c_hi and c_lo along the sequence: device d
holds slots [d S/P, (d + 1) S/P) (contiguous: new tokens append at the end), the batch split
over the mesh's "data" and "fsdp" axes where they divide it, and the small per-row state
(c_run, k_top, KV-shift) replicated over "context". The cache remembers its mesh, and
``prefill`` / ``decode_step`` / ``generate`` take the sharded path from it:

  * a step (and a prefill into a non-empty cache) writes its tokens into the shard that
    owns their slots (a masked scatter inside ``shard_map``, so the cache stays sharded and
    is updated in place) and attends with ``sequence_parallel.tree.tree_attention``: every
    device runs the chunk kernel on its slice with global positions and the global c, and
    the partial (o, lse) are combined with one ``pmax`` and one ``psum`` per layer. A shard
    whose slots are all in the future (unwritten) or all pruned by ACP computes nothing (the
    kernel's tile loops are empty) but joins the collectives;
  * the first prefill (the cache is empty: ``Cache.fresh``) runs the prompt through
    ``sequence_parallel_attention`` (strategy "ring", contiguous layout; the prompt padded
    to a multiple of P) and writes k, v and c into the sharded buffers.

Without a mesh (or with "context" of size 1) nothing changes: one device's arrays, the code
above. S = max_len must be divisible by P: ``init_cache`` raises a ValueError naming max_len
otherwise; ``generate`` pads its internal max_len up to a multiple of P. The chunk kernels
are the config's ``attn_impl`` where it has them ("auto" picks the default backend's Pallas
kernels, else xla; "reference" runs its element-wise ones, O((S / P)^2) memory per device).

All rows of a batch share one length (prompts of equal length).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fox_jax import sharding
from fox_jax.attention import Q_AXES
from fox_jax.config import ModelConfig
from fox_jax.layers import constrain
from fox_jax.model import DecoderLM
from pallas_kernels.forgetting_attention import pruning as pruning_lib
from pallas_kernels.forgetting_attention import registry
from pallas_kernels.forgetting_attention.api import forgetting_attention
from pallas_kernels.forgetting_attention.common import (Cols, Rows, add_pairs,
                                                        compensated_cumsum, row_norms)
from pallas_kernels.sequence_parallel.api import _auto_chunk_impl, sequence_parallel_attention
from pallas_kernels.sequence_parallel.tree import tree_attention

CONTEXT = "context"  # the mesh axis a sharded cache is split over

# log f floor of the cached c (see the module docstring): -2^16.
GATE_FLOOR = -65536.0


class LayerCache(NamedTuple):
  k: jax.Array          # [B, S, Hkv, D]
  v: jax.Array          # [B, S, Hkv, D]
  log_f: Optional[jax.Array]  # [B, S, Hq] float32 (None in a sequence-sharded cache)
  c_hi: jax.Array       # [B, S, Hq] float32
  c_lo: jax.Array       # [B, S, Hq] float32
  c_run_hi: jax.Array   # [B, Hq] float32: c at the last cached position (0 when empty)
  c_run_lo: jax.Array   # [B, Hq] float32
  k_top: jax.Array      # [B, Hkv, D] the cached key of largest norm (non-finite if any is)
  k_shift: Optional[jax.Array]  # [B, Hkv, D] last unshifted key (KV-shift only)
  v_shift: Optional[jax.Array]  # [B, Hkv, D] last unshifted value


@functools.partial(jax.tree_util.register_dataclass, data_fields=("layers", "length"),
                   meta_fields=("mesh", "fresh"))
@dataclasses.dataclass(frozen=True)
class Cache:
  """The layers' caches and the number of cached positions.

  mesh: the mesh whose "context" axis the buffers are split over, or None (one device's
    arrays). fresh: a sharded cache nothing was written to yet (its first prefill runs the
    sequence-parallel op); always False without a mesh. Both are static (part of the
    pytree structure).
  """

  layers: tuple[LayerCache, ...]
  length: jax.Array  # [] int32
  mesh: Optional[Mesh] = None
  fresh: bool = False

  @property
  def max_len(self) -> int:
    return self.layers[0].k.shape[1]


# ----------------------------------------------------------------------------- sharding


def context_size(mesh: Optional[Mesh]) -> int:
  """Devices on ``mesh``'s "context" axis (1 for None); a ValueError naming ``mesh`` if it is
  not a Mesh or has no such axis."""
  if mesh is None:
    return 1
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
  if CONTEXT not in mesh.axis_names:
    raise ValueError(f"mesh has no {CONTEXT!r} axis (its axes: {mesh.axis_names}); a "
                     f"sequence-sharded cache is split over {CONTEXT!r}")
  return mesh.shape[CONTEXT]


def _batch_axes(mesh: Mesh, batch_size: int) -> Optional[tuple[str, ...]]:
  return sharding.batch_axes(mesh, batch_size) or None


def _layer_specs(mesh: Mesh, batch_size: int, lc: LayerCache) -> LayerCache:
  """PartitionSpecs of a sharded layer cache: buffers (batch, context), the rest (batch)."""
  b = _batch_axes(mesh, batch_size)
  seq, row = P(b, CONTEXT), P(b)
  return LayerCache(k=seq, v=seq, log_f=None, c_hi=seq, c_lo=seq, c_run_hi=row, c_run_lo=row,
                    k_top=row, k_shift=None if lc.k_shift is None else row,
                    v_shift=None if lc.v_shift is None else row)


def _place(mesh: Mesh, lc: LayerCache) -> LayerCache:
  """``lc`` with every array constrained to its sharding (eager or under jit)."""
  specs = _layer_specs(mesh, lc.k.shape[0], lc)
  return jax.tree.map(
      lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)), lc, specs)


def _chunk_impl(attn_impl: str) -> str:
  """The implementation whose chunk kernels a sharded cache runs for ``attn_impl``."""
  if attn_impl == "auto":
    return _auto_chunk_impl()
  if attn_impl not in registry.chunk_impls():
    raise ValueError(f"attn_impl {attn_impl!r} has no chunk kernels for a sharded cache; "
                     f"use one of {('auto',) + registry.chunk_impls()}")
  return attn_impl


# ----------------------------------------------------------------------------- cache


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int,
               mesh: Optional[Mesh] = None) -> Cache:
  """An empty cache for ``max_len`` positions.

  mesh: None (one device), or a mesh with a "context" axis: with P > 1 devices there, the
  buffers are split along the sequence over it (see the module docstring) and max_len must
  be divisible by P (else a ValueError naming max_len); P = 1 is the one-device cache.
  """
  shards = context_size(mesh)
  if shards > 1 and max_len % shards:
    raise ValueError(f"max_len {max_len} must be divisible by the mesh's {CONTEXT!r} axis "
                     f"({shards} devices) for a sequence-sharded cache")
  sharded = shards > 1
  B, S, Hq, Hkv, D = batch_size, max_len, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  dt = cfg.compute_dtype
  f32 = lambda *shape: jnp.zeros(shape, jnp.float32)
  shift = lambda on: jnp.zeros((B, Hkv, D), dt) if on else None

  def layer():
    lc = LayerCache(
        k=jnp.zeros((B, S, Hkv, D), dt), v=jnp.zeros((B, S, Hkv, D), dt),
        log_f=None if sharded else f32(B, S, Hq), c_hi=f32(B, S, Hq), c_lo=f32(B, S, Hq),
        c_run_hi=f32(B, Hq), c_run_lo=f32(B, Hq), k_top=jnp.zeros((B, Hkv, D), dt),
        k_shift=shift(cfg.k_shift), v_shift=shift(cfg.v_shift))
    return _place(mesh, lc) if sharded else lc

  return Cache(tuple(layer() for _ in range(cfg.num_layers)), jnp.zeros((), jnp.int32),
               mesh if sharded else None, sharded)


def _write(buf, new, index):
  """buf[:, index:index + T] = new (buf [B, S, ...], new [B, T, ...])."""
  start = (0, index) + (0,) * (buf.ndim - 2)
  return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start)


def _floor_gates(log_f):
  """log f with values below GATE_FLOOR (zero gates) raised to it; NaN stays NaN."""
  return jnp.where(log_f < GATE_FLOOR, GATE_FLOOR, log_f)


def _new_c(lc: LayerCache, log_f):
  """c of T new tokens [B, T, Hq] (pair): the running c plus their floored prefix sums."""
  p_hi, p_lo = compensated_cumsum(_floor_gates(log_f), axis=1)  # [B, T, Hq]
  return add_pairs(lc.c_run_hi[:, None], lc.c_run_lo[:, None], p_hi, p_lo)


def _top_key(k_top, k):
  """The key of largest norm among ``k_top`` [B, Hkv, D] and ``k`` [B, T, Hkv, D], a
  non-finite one if any is (NaN norms rank as inf), so that ``pruning.threshold`` on it
  gives what it gives on every key."""
  rank = lambda n: jnp.where(jnp.isnan(n), jnp.inf, n)
  r = rank(row_norms(k))  # [B, T, Hkv]
  i = jnp.argmax(r, axis=1)  # [B, Hkv]
  best = jnp.take_along_axis(k, i[:, None, :, None], axis=1)[:, 0]  # [B, Hkv, D]
  r_best = jnp.take_along_axis(r, i[:, None], axis=1)[:, 0]
  take = r_best > rank(row_norms(k_top))  # ties keep the older key
  return jnp.where(take[..., None], best.astype(k_top.dtype), k_top)


def _state(lc: LayerCache, k, c, shift) -> LayerCache:
  """``lc`` with the per-row state after T new tokens (c pair ``c``); buffers untouched."""
  k_last, v_last = shift
  return lc._replace(
      c_run_hi=c[0][:, -1], c_run_lo=c[1][:, -1], k_top=_top_key(lc.k_top, k),
      k_shift=None if k_last is None else k_last.astype(lc.k_shift.dtype),
      v_shift=None if v_last is None else v_last.astype(lc.v_shift.dtype))


def _append(lc: LayerCache, k, v, log_f, shift, index) -> LayerCache:
  """Writes T new positions at ``index`` (one device's cache)."""
  c_hi, c_lo = _new_c(lc, log_f)
  lc = _state(lc, k, (c_hi, c_lo), shift)
  return lc._replace(
      k=_write(lc.k, k, index), v=_write(lc.v, v, index), log_f=_write(lc.log_f, log_f, index),
      c_hi=_write(lc.c_hi, c_hi, index), c_lo=_write(lc.c_lo, c_lo, index))


def _step_delta(cfg: ModelConfig, q, lc: LayerCache):
  """ACP threshold [B, Hq] of queries ``q`` against every cached key (after the append), or
  None without pruning: the bound from ``k_top``, S = max_len."""
  if cfg.pruning is None:
    return None
  return pruning_lib.threshold(q, lc.k_top[:, None], cfg.pruning, q.shape[-1] ** -0.5,
                               num_keys=lc.k.shape[1])


# ----------------------------------------------------------------------------- one device


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


def _step_attention(q, lc: LayerCache, index, delta=None):
  """One query [B, 1, Hq, D] at position ``index`` against the cached keys [0, index];
  pairs with D < ``delta`` [B, Hq] dropped (ACP) when given."""
  B, _, Hq, D = q.shape
  S, Hkv = lc.k.shape[1], lc.k.shape[2]
  G = Hq // Hkv
  qg = q[:, 0].reshape(B, Hkv, G, D)
  scores = jnp.einsum("bhgd,bshd->bhgs", qg, lc.k, preferred_element_type=jnp.float32)
  # D_ts = c_t - c_s with c_t the running c (the new token is already appended).
  decay = (lc.c_run_hi[:, None] - lc.c_hi) + (lc.c_run_lo[:, None] - lc.c_lo)  # [B, S, Hq]
  decay = decay.transpose(0, 2, 1).reshape(B, Hkv, G, S)
  logits = scores * (D ** -0.5) + decay
  visible = jnp.arange(S) <= index
  if delta is not None:  # as the kernels: a NaN decay is kept, not dropped
    visible = visible & ~(decay < delta.reshape(B, Hkv, G, 1))
  logits = jnp.where(visible, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  o = jnp.einsum("bhgs,bshd->bhgd", p.astype(lc.v.dtype), lc.v,
                 preferred_element_type=jnp.float32)
  return o.reshape(B, 1, Hq, D).astype(q.dtype)


# ----------------------------------------------------------------------------- sharded


def _sharded_write_attend(cfg: ModelConfig, mesh: Mesh, q, k, v, c, lc: LayerCache, index,
                          delta):
  """Writes T tokens (k, v [B, T, Hkv, D], c pair [B, T, Hq]) at slots [index, index + T) of
  the sharded buffers and attends their queries q [B, T, Hq, D] to every cached key with
  tree attention; returns o [B, T, Hq, D] (q.dtype) and the four new buffers."""
  B, S = q.shape[0], lc.k.shape[1]
  L = S // mesh.shape[CONTEXT]
  b = _batch_axes(mesh, B)
  seq, row = P(b, CONTEXT), P(b)
  impl = _chunk_impl(cfg.attn_impl)
  scale = q.shape[-1] ** -0.5

  def local(index, q, k, v, c_hi, c_lo, kb, vb, chb, clb, *delta):
    T = q.shape[1]
    first = jax.lax.axis_index(CONTEXT) * L  # global position of this shard's slot 0
    slots = index + jnp.arange(T, dtype=jnp.int32) - first
    slots = jnp.where((slots >= 0) & (slots < L), slots, L)  # L: not this shard's, dropped
    put = lambda buf, new: buf.at[:, slots].set(new.astype(buf.dtype), mode="drop")
    kb, vb, chb, clb = put(kb, k), put(vb, v), put(chb, c_hi), put(clb, c_lo)
    rows = Rows(q, c_hi, c_lo, None, index + jnp.arange(T, dtype=jnp.int32))
    cols = Cols(kb, vb, chb, clb, None, first + jnp.arange(L, dtype=jnp.int32))
    o, _ = tree_attention(rows, cols, delta[0] if delta else None, axis_name=CONTEXT,
                          sm_scale=scale, impl=impl, block_sizes=cfg.block_sizes)
    return o.astype(q.dtype), kb, vb, chb, clb

  extra = () if delta is None else (delta,)
  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(P(),) + (row,) * 5 + (seq,) * 4 + (row,) * len(extra),
                     out_specs=(row,) + (seq,) * 4, check_vma=False)
  return fn(index, q, k, v, c[0], c[1], lc.k, lc.v, lc.c_hi, lc.c_lo, *extra)


def _sharded_prefill_fresh(cfg: ModelConfig, mesh: Mesh, q, k, v, log_f, c, lc: LayerCache):
  """The prompt's attention with ``sequence_parallel_attention`` (ring, contiguous; padded
  to a multiple of P) and its k, v, c as the new sharded buffers (the cache was empty)."""
  B, T = q.shape[:2]
  S, shards = lc.k.shape[1], mesh.shape[CONTEXT]
  Tp = -(-T // shards) * shards
  pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  prune = cfg.pruning
  if prune is not None:
    # The op's threshold has log(Tp) where the one-device prefill (a buffer of max_len) has
    # log(max_len): shift log eps so that both prune the same pairs.
    prune = dataclasses.replace(prune, log_tolerance=prune.log_tolerance + math.log(Tp / S))
  o = sequence_parallel_attention(
      pad(q, Tp), pad(k, Tp), pad(v, Tp), pad(log_f, Tp), mesh=mesh, strategy="ring",
      axis_name=CONTEXT, batch_axes=_batch_axes(mesh, B), pruning=prune,
      impl=_chunk_impl(cfg.attn_impl), block_sizes=cfg.block_sizes)[:, :T]
  return o, lc._replace(k=pad(k.astype(lc.k.dtype), S), v=pad(v.astype(lc.v.dtype), S),
                        c_hi=pad(c[0], S), c_lo=pad(c[1], S))


# ----------------------------------------------------------------------------- model


def _run(model: DecoderLM, ids, cache: Cache, layer_fn):
  """Shared body of prefill and decode_step: the model's blocks with cached attention.

  layer_fn(q, k, v, log_f, shift, lc) -> (o, lc with the new tokens appended)."""
  B, T = ids.shape
  index = cache.length
  positions = jnp.broadcast_to(index + jnp.arange(T, dtype=jnp.int32), (B, T))
  x = model.embed(ids)  # [B, T, d]
  layers = []
  for block, lc in zip(model.layers, cache.layers):
    h = block.attn_norm(x)
    q, k, v, log_f, shift = block.attn.qkv(h, positions=positions,
                                           shift_state=(lc.k_shift, lc.v_shift))
    o, lc = layer_fn(q, k, v, log_f, shift, lc)
    if cache.mesh is not None:
      lc = _place(cache.mesh, lc)
    o = constrain(o, Q_AXES)
    x = x + block.attn.output(o, h)
    x = block.mlp_residual(x)
    layers.append(lc)
  return model.logits(x), dataclasses.replace(cache, layers=tuple(layers), length=index + T,
                                              fresh=False)


def _sharded_layer_fn(cfg: ModelConfig, cache: Cache, fresh: bool):
  mesh, index = cache.mesh, cache.length

  def fn(q, k, v, log_f, shift, lc):
    c = _new_c(lc, log_f)
    lc = _state(lc, k, c, shift)
    if fresh:
      return _sharded_prefill_fresh(cfg, mesh, q, k, v, log_f, c, lc)
    o, kb, vb, chb, clb = _sharded_write_attend(cfg, mesh, q, k, v, c, lc, index,
                                                _step_delta(cfg, q, lc))
    return o, lc._replace(k=kb, v=vb, c_hi=chb, c_lo=clb)

  return fn


def prefill(model: DecoderLM, ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """Appends ``ids`` [B, T] to ``cache`` with the parallel op; logits [B, T, V] float32.

  The cache must have room: length + T <= max_len. A sequence-sharded cache runs the
  sequence-parallel op when it is empty (``cache.fresh``), tree attention otherwise.
  """
  T = ids.shape[1]
  if cache.fresh and T > cache.max_len:
    raise ValueError(f"the prompt ({T} tokens) is longer than the cache's max_len "
                     f"{cache.max_len}")
  cfg = model.cfg
  if cache.mesh is not None:
    return _run(model, ids, cache, _sharded_layer_fn(cfg, cache, cache.fresh))
  index = cache.length
  end = index + T

  def fn(q, k, v, log_f, shift, lc):
    lc = _append(lc, k, v, log_f, shift, index)
    return _prefill_attention(cfg, q, lc, end), lc

  return _run(model, ids, cache, fn)


def decode_step(model: DecoderLM, ids: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """Appends one token per row, ``ids`` [B]; returns its logits [B, V] float32."""
  cfg = model.cfg
  index = cache.length
  if cache.fresh:
    # The fresh flag is static (it picks the first prefill's code), so a step on a fresh
    # cache would return a cache of another pytree structure (lax.scan carries break).
    raise ValueError("decode_step: prefill a sharded cache (decode.prefill) before its "
                     "first decode_step")
  if cache.mesh is not None:
    fn = _sharded_layer_fn(cfg, cache, fresh=False)
  else:
    def fn(q, k, v, log_f, shift, lc):
      lc = _append(lc, k, v, log_f, shift, index)
      return _step_attention(q, lc, index, _step_delta(cfg, q, lc)), lc
  logits, cache = _run(model, ids[:, None], cache, fn)
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
             rng: Optional[jax.Array] = None, mesh: Optional[Mesh] = None) -> jax.Array:
  """Prompt [B, P] -> [B, P + max_new_tokens]: prefill, then ``decode_step`` under ``jit``.

  temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted
  to the ``top_k`` most likely tokens when given. ``rng`` is required when sampling.
  mesh: as for ``init_cache``: with P > 1 devices on its "context" axis the cache is split
  along the sequence over them (its length, P + max_new_tokens, padded up to a multiple of
  P).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= model.cfg.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
  if temperature > 0 and rng is None:
    raise ValueError("rng is required when temperature > 0")
  shards = context_size(mesh)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  new = _generate(graphdef, state, jnp.asarray(prompt_ids, jnp.int32), rng, max_new_tokens,
                  float(temperature), top_k, mesh if shards > 1 else None)
  return jnp.concatenate([prompt_ids.astype(jnp.int32), new], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, state, prompt, rng, max_new_tokens, temperature, top_k, mesh):
  model = nnx.merge(graphdef, state)
  B, T = prompt.shape
  shards = context_size(mesh)
  max_len = -(-(T + max_new_tokens) // shards) * shards
  cache = init_cache(model.cfg, B, max_len, mesh)
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

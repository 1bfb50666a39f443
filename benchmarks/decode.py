"""Cached decoding with a sequence-sharded KV cache (Tree Attention) against one device's cache.

Usage:

    PYTHONPATH=. python benchmarks/decode.py                        # 8 simulated CPU devices
    PYTHONPATH=. python benchmarks/decode.py --lengths 4096,16384,65536 --steps 16
    # on a host with 8 GPUs or a TPU slice (real devices, no simulation):
    PYTHONPATH=. python benchmarks/decode.py --real-devices --preset fox_pro_125m --dtype bfloat16

One table: for each cache length S (max_len), the bytes of the KV cache each device holds
(``addressable_shards``: k, v, c and the per-row state of every layer; the one-device cache
also holds log f for its parallel-op prefill) and the temporary bytes of the compiled step
(``memory_analysis``, per device), and the time of one ``decode_step`` (median of --reps runs
of --steps steps under one ``lax.scan``, divided by --steps) with the cache filled to
S - steps - 1 tokens, for: one device (the dense step, O(S)), the cache split over P
devices on "context" (``init_cache(..., mesh=)``: tree attention, one pmax and one psum per
layer), and the same with ACP (log eps = -10). The cache is filled with synthetic keys,
values and gates (forget gates with a decay length of --decay tokens), not by a prefill, so
long caches cost no prompt.

On simulated CPU devices the P "devices" share this machine's cores and a collective is a
memcpy: the times show the total work and the per-step overheads (shard_map, collectives,
the chunk kernel's loops), not a parallel speed-up, and on a shared machine they are noisy.
Shards whose keys are all pruned (or not yet written) skip their tile loops, but the xla
chunk kernel re-lays every shard's k, v and c into tiles on each call (a copy of the shard,
part of the step-temporary column), so on a CPU a step keeps a cost linear in S / P per
device even when ACP prunes most shards. The bytes are what one device of a real mesh would
hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

if "--real-devices" not in sys.argv:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fox_jax import decode  # noqa: E402
from fox_jax.config import get_preset  # noqa: E402
from fox_jax.model import DecoderLM  # noqa: E402
from fox_jax.sharding import make_mesh  # noqa: E402
from pallas_kernels.forgetting_attention.common import compensated_cumsum  # noqa: E402


def filled_cache(cfg, B, S, length, mesh, decay, seed=0):
  """A cache of S slots holding ``length`` synthetic tokens (normal keys and values, forget
  gates log f = -1 / decay), placed like ``init_cache``'s arrays."""
  cache = decode.init_cache(cfg, B, S, mesh)
  rng = np.random.default_rng(seed)
  Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  valid = (np.arange(S) < length)[None, :, None]
  layers = []
  for lc in cache.layers:
    k = (rng.normal(size=(B, S, Hkv, D)) * valid[..., None]).astype(np.float32)
    v = (rng.normal(size=(B, S, Hkv, D)) * valid[..., None]).astype(np.float32)
    lf = np.where(valid, -rng.uniform(0.5, 1.5, size=(B, S, Hq)) / decay, 0.0).astype(np.float32)
    c_hi, c_lo = compensated_cumsum(jnp.asarray(lf), axis=1)
    put = lambda x, like: jax.device_put(jnp.asarray(x, like.dtype), like.sharding)
    k, v = put(k, lc.k), put(v, lc.v)
    layers.append(lc._replace(
        k=k, v=v, log_f=None if lc.log_f is None else put(lf, lc.log_f),
        c_hi=put(c_hi, lc.c_hi), c_lo=put(c_lo, lc.c_lo),
        c_run_hi=put(c_hi[:, length - 1], lc.c_run_hi),
        c_run_lo=put(c_lo[:, length - 1], lc.c_run_lo),
        k_top=put(decode._top_key(lc.k_top, k), lc.k_top)))
  return dataclasses.replace(cache, layers=tuple(layers), length=jnp.int32(length), fresh=False)


def _steps(graphdef, state, cache, toks):
  model = nnx.merge(graphdef, state)

  def body(cache, tok):
    logits, cache = decode.decode_step(model, tok, cache)
    return cache, logits[:, 0]

  cache, out = jax.lax.scan(body, cache, toks)
  return out, cache


steps_fn = jax.jit(_steps, static_argnums=0, donate_argnums=2)


def cache_bytes(cache) -> int:
  """Bytes of the cache on the device holding the most (first addressable shard of every
  array, per device)."""
  per_device = {}
  for x in jax.tree.leaves(cache.layers):
    for s in x.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
  return max(per_device.values())


def measure(model, cfg, B, S, mesh, args):
  """(cache MiB per device, step temp MiB per device, step ms)."""
  length = S - args.steps - 1
  toks = jnp.zeros((args.steps, B), jnp.int32)
  graphdef, state = nnx.split(model)
  cache = filled_cache(cfg, B, S, length, mesh, args.decay)
  mib = cache_bytes(cache) / 2**20
  compiled = steps_fn.trace(graphdef, state, cache, toks).lower().compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20 if mem else float("nan")
  ts = []
  for _ in range(args.reps + 1):  # the first run warms up
    cache = filled_cache(cfg, B, S, length, mesh, args.decay)
    jax.block_until_ready(cache)
    t = time.perf_counter()
    out, cache = compiled(state, cache, toks)
    jax.block_until_ready(out)
    ts.append(time.perf_counter() - t)
  return mib, temp, 1e3 * float(np.median(ts[1:])) / args.steps


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lengths", default="4096,16384,65536")
  p.add_argument("--preset", default="fox_pro_tiny")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--context", type=int, default=None,
                 help="devices on the 'context' axis (default: all)")
  p.add_argument("--steps", type=int, default=16, help="decode steps per timed run")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--decay", type=float, default=64.0,
                 help="decay length (tokens) of the synthetic cached forget gates")
  p.add_argument("--impl", default="xla", help="attn_impl of the model config")
  p.add_argument("--real-devices", action="store_true",
                 help="use the machine's devices instead of 8 simulated CPU devices")
  args = p.parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  P = args.context or len(jax.devices())
  mesh = make_mesh({"context": P}, jax.devices()[:P])
  base = get_preset(args.preset, attn_impl=args.impl, dtype=args.dtype)
  cfgs = {"plain": base, "acp": base.replace(pruning=dict(log_tolerance=-10.0))}
  models = {k: DecoderLM(c, rngs=nnx.Rngs(0)) for k, c in cfgs.items()}
  print(f"# decode.py: jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} "
        f"devices ({jax.devices()[0].device_kind}), {time.strftime('%Y-%m-%d')}")
  print(f"# command: {' '.join(['python'] + sys.argv)}")
  print(f"\n## Decode step: cache and step-temporary MiB per device, ms per step "
        f"({args.preset}: {base.num_layers} layers, Hq = {base.num_heads}, "
        f"Hkv = {base.num_kv_heads}, D = {base.head_dim}, {args.dtype}, B = {args.batch}, "
        f"P = {P} on 'context', impl {args.impl}, gates decay ~{args.decay:g} tokens, cache "
        f"filled to S - {args.steps + 1})\n")
  print("| S | cache MiB: 1 device | sharded | step temp MiB: 1 device | sharded "
        "| ms/step: 1 device | sharded | sharded + ACP |")
  print("|---|---|---|---|---|---|---|---|")
  for S in lengths:
    one = measure(models["plain"], cfgs["plain"], args.batch, S, None, args)
    shard = measure(models["plain"], cfgs["plain"], args.batch, S, mesh, args)
    acp = measure(models["acp"], cfgs["acp"], args.batch, S, mesh, args)
    print(f"| {S} | {one[0]:.2f} | {shard[0]:.3f} | {one[1]:.2f} | {shard[1]:.3f} "
          f"| {one[2]:.2f} | {shard[2]:.2f} | {acp[2]:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
  main()

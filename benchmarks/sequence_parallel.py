"""Sequence-parallel forgetting attention: balance, bytes, ACP's ring savings, time, memory.

Usage (recorded runs: benchmarks/NOTES.md and the README):

    PYTHONPATH=. python benchmarks/sequence_parallel.py             # 8 simulated CPU devices
    PYTHONPATH=. python benchmarks/sequence_parallel.py --tables balance,bytes,steps
    # on a host with 8 GPUs or a TPU slice (real devices, no simulation):
    PYTHONPATH=. python benchmarks/sequence_parallel.py --real-devices --tables time \\
        --lengths 16384,32768,65536,131072 --heads 16 --kv-heads 4 --head-dim 128

Tables (P = devices on the sequence axis, tiles 128 x 128 unless --tile):
  balance  per-device work, in kept (query tile, key tile) pairs, max / mean over the devices,
           per strategy, without and with ACP (log eps = -10, q, k ~ N(0, 1)), for forget
           gates weak (log f ~ -3e-4), medium (f ~ 0.5), strong (log f < -8) and spread
           (per-head decay lengths 2 .. 4096 tokens). Counted from the kernels' own tile
           ranges (``pruning.chunk_tile_ranges``) at every device's chunk pairs: what each
           device computes, with no timing noise. Ulysses: each device's heads over the
           whole sequence.
  bytes    bytes each device sends per forward and per forward + backward, read from the
           compiled program (``traffic.collective_traffic``: collective-permutes,
           all-to-alls and all-gathers, loops times their trip counts).
  steps    ring steps the truncated ring (strategy "ring", ``ring_steps``) needs under ACP:
           the smallest n such that ACP prunes every chunk pair n or more chunks apart, for
           all heads and for all heads but the one with the longest memory, against the
           context length; gates medium, strong, "spread to 4k" (decay lengths 2 .. 4096
           tokens) and "spread to S" (2 .. S tokens, benchmarks/attention.py's).
  time     forward + backward time and per-device temporary memory (the compiled program's
           ``memory_analysis``) against S, one device against each strategy over P devices.
           On simulated CPU devices all P share this machine's cores and a transfer is a
           memcpy: the times show total work and overheads, not a parallel speed-up; the
           memory column is what one device of a real mesh would need. Lengths past
           --time-max are compiled for their memory only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--real-devices" not in sys.argv:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from pallas_kernels.forgetting_attention import api, common, pruning  # noqa: E402
from pallas_kernels.forgetting_attention.common import BlockSizes  # noqa: E402
from pallas_kernels.forgetting_attention.pruning import Pruning  # noqa: E402
from pallas_kernels.sequence_parallel import (STRATEGIES, sequence_parallel_attention,  # noqa: E402
                                              strategy_layout)
from pallas_kernels.sequence_parallel.traffic import collective_traffic  # noqa: E402

GATES = ("weak", "medium", "strong", "spread")


def log_fgate(rng, B, S, H, gate, max_len=4096):
  if gate in ("spread", "spread_s"):
    top = 4096.0 if gate == "spread" else float(S)
    lengths = 2.0 * (top / 2.0) ** (np.arange(H) / max(H - 1, 1))
    return (np.log1p(-1.0 / lengths)[None, None, :]
            * rng.uniform(0.5, 1.5, size=(B, S, H))).astype(np.float32)
  mean, std = {"weak": (8.0, 1.0), "medium": (0.0, 2.0), "strong": (-9.0, 1.0)}[gate]
  return (-np.logaddexp(0.0, -rng.normal(mean, std, size=(B, S, H)))).astype(np.float32)


def _qk(rng, B, S, H, D):
  return (jnp.asarray(rng.normal(size=(B, S, H, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(B, S, H, D)), jnp.float32))


# ------------------------------------------------------------------------------- balance


def device_work(strategy, c_hi, c_lo, delta, P, tile):
  """[P] kept tile pairs per device (summed over batch and heads)."""
  B, S, H = c_hi.shape
  if strategy == "ulysses":
    r = pruning.tile_ranges(c_hi, c_lo, None, S, tile, tile, delta)
    per_head = np.asarray(r.kept_tiles()).sum(axis=0)  # [H]
    return per_head.reshape(P, H // P).sum(axis=1)
  layout = strategy_layout(strategy, S, P)
  pos = layout.shard_positions()
  at = lambda x, d: jnp.take(x, jnp.asarray(pos[d]), axis=1)
  work = np.zeros(P)
  for d in range(P):
    for e in range(P):
      r = pruning.chunk_tile_ranges(at(c_hi, d), at(c_lo, d), at(c_hi, e), at(c_lo, e), None,
                                    None, jnp.asarray(pos[d]), jnp.asarray(pos[e]), tile, tile,
                                    delta)
      work[d] += float(np.asarray(r.kept_tiles()).sum())
  return work


def balance_table(args):
  S, P, H, D, tile = args.balance_length, args.devices, args.heads, args.head_dim, args.tile
  rng = np.random.default_rng(0)
  q, k = _qk(rng, 1, S, H, D)
  print(f"\n## Per-device work: max / mean kept tile pairs (S = {S}, P = {P}, H = {H}, "
        f"D = {D}, tiles {tile} x {tile})\n")
  print("| gates | ACP | " + " | ".join(STRATEGIES) + " | kept of causal (ring) |")
  print("|---|---|" + "---|" * len(STRATEGIES) + "---|")
  for gate in GATES:
    lf = jnp.asarray(log_fgate(rng, 1, S, H, gate))
    c_hi, c_lo = common.compensated_cumsum(lf, axis=1)
    for acp in (False, True):
      delta = pruning.threshold(q, k, Pruning(log_tolerance=-10.0), D ** -0.5) if acp else None
      cells, kept = [], None
      for strategy in STRATEGIES:
        w = device_work(strategy, c_hi, c_lo, delta, P, tile)
        cells.append(f"{w.max() / w.mean():.3f}")
        if strategy == "ring":
          kept = w.sum()
          causal = device_work("ring", c_hi, c_lo, None, P, tile).sum()
      print(f"| {gate} | {'on' if acp else 'off'} | " + " | ".join(cells)
            + f" | {kept / causal:.3f} |")


# --------------------------------------------------------------------------------- bytes

def _mesh(P):
  return Mesh(np.array(jax.devices()[:P]), ("context",))


def _lower(strategy, S, P, H, Hkv, D, grad, dtype=jnp.float32):
  mesh = _mesh(P)
  sd = jax.ShapeDtypeStruct
  shapes = (sd((1, S, H, D), dtype), sd((1, S, Hkv, D), dtype), sd((1, S, Hkv, D), dtype),
            sd((1, S, H), jnp.float32))

  def fwd(q, k, v, lf):
    return sequence_parallel_attention(q, k, v, lf, mesh=mesh, strategy=strategy,
                                       impl="xla" if strategy != "ulysses" else "auto")

  def fwd_bwd(q, k, v, lf):  # value_and_grad: the forward's output stays live
    return jax.value_and_grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)),
                              argnums=(0, 1, 2, 3))(q, k, v, lf)

  return jax.jit(fwd_bwd if grad else fwd).trace(*shapes).lower()


def _sent(strategy, S, P, H, Hkv, D, grad):
  traffic = collective_traffic(_lower(strategy, S, P, H, Hkv, D, grad).compile().as_text(), P)
  return sum(t.bytes for t in traffic.values())


def bytes_table(args):
  S, H, Hkv, D = args.bytes_length, args.heads, args.kv_heads, args.head_dim
  print(f"\n## Bytes sent per device (S = {S}, H = {H}, Hkv = {Hkv}, D = {D}, float32 q, k, v "
        f"(the CPU compiler widens bfloat16 transfers to float32: with bfloat16 on a GPU or "
        f"TPU, k and v move half these bytes); MiB)\n")
  print("| P | strategy | forward | per ring step | forward + backward |")
  print("|---|---|---|---|---|")
  for P in (2, 4, 8):
    for strategy in STRATEGIES:
      if strategy == "ulysses" and (H % P or (Hkv % P and P % Hkv)):
        continue
      f = _sent(strategy, S, P, H, Hkv, D, False)
      fb = _sent(strategy, S, P, H, Hkv, D, True)
      step = f"{f / (P - 1) / 2**20:.2f}" if strategy != "ulysses" else "-"
      print(f"| {P} | {strategy} | {f / 2**20:.2f} | {step} | {fb / 2**20:.2f} |")
      sys.stdout.flush()


# --------------------------------------------------------------------------------- steps


def needed_steps(c, delta, P):
  """Smallest n such that every contiguous chunk pair n or more apart is pruned, per head
  set: c [S, H] float64, delta [H]; returns n over all heads and per head [H]."""
  S, H = c.shape
  L = S // P
  first, last = c[::L], c[L - 1::L]  # [P, H]
  per_head = np.full(H, P)
  for n in range(P, 0, -1):
    ok = np.ones(H, bool)
    for d in range(n, P):
      ok &= (first[d] - last[d - n]) < delta
    per_head = np.where(ok, n, per_head)
  return per_head


def steps_table(args):
  P, H, D = args.devices, args.heads, args.head_dim
  print(f"\n## Ring steps needed under ACP (contiguous ring, P = {P}, H = {H}, D = {D}, "
        f"log eps = -10)\n")
  print("| gates | S | all heads | all heads but the longest-memory one | steps saved of P |")
  print("|---|---|---|---|---|")
  for gate in ("medium", "strong", "spread", "spread_s"):
    for S in args.steps_lengths:
      rng = np.random.default_rng(1)
      q, k = _qk(rng, 1, S, H, D)
      delta = np.asarray(pruning.threshold(q, k, Pruning(log_tolerance=-10.0), D ** -0.5))[0]
      c = np.cumsum(log_fgate(rng, 1, S, H, gate)[0].astype(np.float64), axis=0)
      per_head = needed_steps(c, delta, P)
      allh, but = per_head.max(), np.sort(per_head)[-2] if H > 1 else per_head.max()
      name = {"spread": "spread to 4k", "spread_s": "spread to S"}.get(gate, gate)
      print(f"| {name} | {S} | {allh} | {but} | {P - allh} |")


# ---------------------------------------------------------------------------------- time


def _time(fn, args, reps):
  out = fn(*args)
  jax.block_until_ready(out)
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def time_table(args):
  P, H, Hkv, D = args.devices, args.heads, args.kv_heads, args.head_dim
  mesh = _mesh(P)
  print(f"\n## Forward + backward on {P} {jax.devices()[0].platform} devices: time (s) and "
        f"per-device temporary memory (MiB) (H = {H}, Hkv = {Hkv}, D = {D}, bf16, "
        f"spread gates, no ACP)\n")
  print("| S | one device | " + " | ".join(STRATEGIES) + " | compile |")
  print("|---|---|" + "---|" * len(STRATEGIES) + "---|")
  for S in args.lengths:
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, S, H, D)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(1, S, Hkv, D)), jnp.bfloat16) for _ in range(2))
    lf = jnp.asarray(log_fgate(rng, 1, S, H, "spread"))
    cells, compile_times = [], []
    for strategy in (None,) + tuple(STRATEGIES):
      if strategy == "ulysses" and (H % P or (Hkv % P and P % Hkv)):
        cells.append("-")
        continue
      if strategy is None:
        f = lambda q, k, v, lf: api.forgetting_attention(q, k, v, lf, impl=args.impl)
      else:
        lay = strategy_layout(strategy, S, P)
        f = (lambda s: lambda q, k, v, lf: sequence_parallel_attention(
            q, k, v, lf, mesh=mesh, strategy=s,
            impl=args.impl if s == "ulysses" or args.impl in ("auto", "xla") else args.impl))(
                strategy)
      g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3)))
      t0 = time.perf_counter()
      compiled = g.trace(q, k, v, lf).lower().compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20 if mem else float("nan")
      if S <= args.time_max:
        secs = _time(compiled, (q, k, v, lf), args.reps)
        cells.append(f"{secs:.2f} s, {temp:.0f} MiB")
      else:
        cells.append(f"-, {temp:.0f} MiB")
      compile_times.append(compile_s)
    print(f"| {S} | " + " | ".join(cells) + f" | {min(compile_times):.0f}-"
          f"{max(compile_times):.0f} s |")
    sys.stdout.flush()


TABLES = {"balance": balance_table, "bytes": bytes_table, "steps": steps_table,
          "time": time_table}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tables", default=",".join(TABLES))
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--tile", type=int, default=128)
  p.add_argument("--balance-length", type=int, default=16384)
  p.add_argument("--bytes-length", type=int, default=16384)
  p.add_argument("--steps-lengths", default="16384,32768,65536,131072")
  p.add_argument("--lengths", default="4096,8192,16384,32768,65536")
  p.add_argument("--time-max", type=int, default=16384,
                 help="time lengths up to this; longer ones are compiled for memory only")
  p.add_argument("--impl", default="auto")
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--real-devices", action="store_true",
                 help="use the machine's devices instead of 8 simulated CPU devices")
  args = p.parse_args(argv)
  args.steps_lengths = [int(x) for x in args.steps_lengths.split(",")]
  args.lengths = [int(x) for x in args.lengths.split(",")]
  for name in args.tables.split(","):
    if name not in TABLES:
      p.error(f"--tables: unknown table {name!r}; choose from {', '.join(TABLES)}")
  print(f"# sequence_parallel.py: jax {jax.__version__}, {len(jax.devices())} "
        f"{jax.devices()[0].platform} devices, {time.strftime('%Y-%m-%d')}")
  for name in args.tables.split(","):
    TABLES[name](args)


if __name__ == "__main__":
  main()

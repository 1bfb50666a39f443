"""Forgetting-attention speed: pallas_gpu against xla, plain causal attention and fla-core.

Usage (see benchmarks/NOTES.md for recorded runs):

    PYTHONPATH=. python benchmarks/attention.py                 # GPU: the full tables
    PYTHONPATH=. python benchmarks/attention.py --quick         # CPU: small sizes, a smoke run
    PYTHONPATH=. python benchmarks/attention.py --tune          # GPU: block-size sweep at T=16k

Table 1, speed: forward and forward+backward time (median of ``--reps`` timed calls after
warm-up; JAX timed with ``block_until_ready``, PyTorch with CUDA events) and TFLOP/s for
T in {1k, ..., 16k}, D in {64, 128}, bf16, B * T = 16k tokens and H * D = 2048. FLOPs
follow the FlashAttention convention: forward 4 * B * T^2 * D * H / 2 (causal), backward
2.5x forward, so forward+backward is 3.5x forward. Implementations:
  pallas_gpu   this project's Triton kernels (``impl="pallas_gpu"``), no pruning
  xla          this project's blockwise plain-JAX version (only up to ``--xla-max-t``: it is a
               reference-speed fallback, not a contender)
  pallas_tpu   this project's Mosaic TPU kernels (on a TPU)
  cudnn        ``jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")``:
               plain causal attention with no forget gate, the ceiling for a gated kernel
  plain_<impl> ``plain_attention(impl=<impl>)``: what the Transformer baselines run
               (forget_gate "none"), through the same op layer as the FoX kernels: auto
               (cudnn on a GPU without segments, pallas_gpu with them; pallas_tpu on a TPU;
               xla elsewhere), cudnn, pallas_gpu (JAX's Pallas flash attention), pallas_tpu
               (splash), xla (this project's blockwise kernels without the gate)
  fla          fla-core's ``parallel_forgetting_attn`` (PyTorch/Triton), when importable

``--segments N`` packs N equal documents into every row (segment ids for every op; cudnn
and dpa_xla, which take none, are skipped). A last table gives each forgetting
implementation's time over plain_auto's at the same size: the FoX overhead against the
Transformer's attention.

Table 2, pruning (ACP): kept-tile fraction (``return_stats``) and forward+backward time
with ``Pruning(log_tolerance=-10, qk_bound="auto")`` against the unpruned kernel for
T in {4k, 8k, 16k, 32k}, D = 128. Forget gates are drawn per head so that decay lengths
spread log-uniformly from a few tokens to the whole context: head h of H gets the decay
length L_h = 2 * (T / 2) ** (h / (H - 1)) (2 tokens up to T) and
log f_t = log(1 - 1 / L_h) * u_t with u_t ~ Uniform(0.5, 1.5) per token. q, k, v ~ N(0, 1).

Every implementation is checked first on a small case (T = 256, GQA off, same gates)
against the float32 reference with float32 inputs upcast from the bf16 ones; one that
disagrees (relative error of o or any gradient above 3e-2) is reported and not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.forgetting_attention import api
from pallas_kernels.forgetting_attention.common import BlockSizes
from pallas_kernels.forgetting_attention.plain import plain_attention
from pallas_kernels.forgetting_attention.pruning import Pruning

VERIFY_TOL = 3e-2
PLAIN = "plain_"  # prefix of the plain_attention rows
# What runs where: the portable rows everywhere, the others on their backend.
PORTABLE = ("xla", "plain_xla", "plain_auto")
ON_BACKEND = {"gpu": ("pallas_gpu", "cudnn", "dpa_xla", "fla", "plain_cudnn", "plain_pallas_gpu"),
              "tpu": ("pallas_tpu", "plain_pallas_tpu")}
NO_SEGMENTS = ("cudnn", "dpa_xla", "plain_cudnn", "fla")  # rows that take no segment ids


def spread_log_fgate(rng, B, T, H):
  """[B, T, H] float32 log forget gates with per-head decay lengths from 2 to T tokens."""
  lengths = 2.0 * (T / 2.0) ** (np.arange(H) / max(H - 1, 1))
  base = np.log1p(-1.0 / lengths)[None, None, :]
  return (base * rng.uniform(0.5, 1.5, size=(B, T, H))).astype(np.float32)


def make_inputs(B, T, H, D, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, do = (jnp.asarray(rng.normal(size=(B, T, H, D)), dtype) for _ in range(4))
  return q, k, v, jnp.asarray(spread_log_fgate(rng, B, T, H)), do


def segment_ids(B, T, n):
  """[B, T] int32: n equal packed documents per row (ids 1..n), or None for n = 0."""
  if not n:
    return None
  return jnp.asarray(np.broadcast_to(1 + np.arange(T) * n // T, (B, T)), jnp.int32)


def flops_fwd(B, T, H, D):
  return 4.0 * B * T * T * D * H / 2.0


# ----------------------------------------------------------------------------- implementations


def jax_attention(impl, block_sizes=None, pruning=None, segments=None):
  """(fwd, fwd_bwd) jitted callables of (q, k, v, log_fgate, do); ``segments`` [B, T] ids."""
  if impl == "cudnn" or impl == "dpa_xla":
    backend = "cudnn" if impl == "cudnn" else "xla"

    def f(q, k, v, lf):
      del lf
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=backend)
  elif impl.startswith(PLAIN):
    def f(q, k, v, lf):
      del lf  # no gate
      return plain_attention(q, k, v, segment_ids=segments, impl=impl[len(PLAIN):],
                             block_sizes=block_sizes)
  else:
    def f(q, k, v, lf):
      return api._forgetting_attention(q, k, v, lf, segment_ids=segments, sm_scale=None,
                                       pruning=pruning, impl=impl, block_sizes=block_sizes,
                                       interpret=False, return_stats=False)

  def fwd_bwd(q, k, v, lf, do):
    o, vjp = jax.vjp(f, q, k, v, lf)
    return vjp(do)

  return jax.jit(f), jax.jit(fwd_bwd)


def time_jax(fn, args, reps, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def fla_available():
  try:
    import torch
    from fla.ops.forgetting_attn import parallel_forgetting_attn  # noqa: F401
    return torch.cuda.is_available()
  except Exception as e:  # any import or driver problem means: no fla column
    print(f"# fla-core not usable here: {type(e).__name__}: {e}", file=sys.stderr)
    return False


def fla_fns(q, k, v, lf, do):
  """fla's fwd and fwd+bwd closures on torch copies of the inputs."""
  import torch
  from fla.ops.forgetting_attn import parallel_forgetting_attn
  t = lambda x, g=False: torch.from_numpy(np.array(x.astype(jnp.float32))).cuda().to(
      torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32).requires_grad_(g)
  tq, tk, tv = t(q, True), t(k, True), t(v, True)
  tg = torch.from_numpy(np.array(lf)).cuda().requires_grad_(True)
  tdo = t(do)
  scale = q.shape[-1] ** -0.5

  def fwd():
    return parallel_forgetting_attn(tq, tk, tv, tg, scale=scale)

  def fwd_bwd():
    o = parallel_forgetting_attn(tq, tk, tv, tg, scale=scale)
    return torch.autograd.grad(o, (tq, tk, tv, tg), tdo)

  return fwd, fwd_bwd


def time_torch(fn, reps, warmup=2):
  import torch
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  return statistics.median(times)


# ----------------------------------------------------------------------------- verification


def _rel(a, r):
  a = np.asarray(a, np.float64)
  r = np.asarray(r, np.float64)
  return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30))


def verify(impl, dtype, D, use_fla, segments=0):
  """Max relative error of o and all gradients against the float32 reference (small case)."""
  B, T, H = 1, 256, 4
  q, k, v, lf, do = make_inputs(B, T, H, D, dtype, seed=1)
  seg = segment_ids(B, T, segments)
  up = lambda x: x.astype(jnp.float32)
  plain = impl in ("cudnn", "dpa_xla") or impl.startswith(PLAIN)
  if plain:  # no gate: the forgetting reference with log f = 0
    lf = jnp.zeros_like(lf)
  ref_f = lambda q, k, v, lf: api._forgetting_attention(
      q, k, v, lf, segment_ids=seg, sm_scale=None, pruning=None, impl="reference",
      block_sizes=None, interpret=False, return_stats=False)
  ro, rvjp = jax.vjp(ref_f, up(q), up(k), up(v), lf)
  ref = [ro, *rvjp(up(do))]
  if impl == "fla":
    fwd, fwd_bwd = fla_fns(q, k, v, lf, do)
    got = [fwd().detach().float().cpu().numpy(),
           *[g.detach().float().cpu().numpy() for g in fwd_bwd()]]
  else:
    f, fb = jax_attention(impl, segments=seg)
    got = [f(q, k, v, lf), *fb(q, k, v, lf, do)]
  errs = [_rel(a, r) for a, r in zip(got, ref)]
  if plain:
    errs = errs[:4]  # plain attention has no gate gradient
  return max(errs)


# ----------------------------------------------------------------------------- tables


def speed_table(args, impls, use_fla):
  dtype = jnp.dtype(args.dtype)
  rows = []
  print(f"\n## speed: {args.dtype}, B*T = {args.tokens} tokens, H*D = {args.width}, "
        f"{args.segments or 'no'} packed documents per row, median of {args.reps}")
  print("| impl | T | D | B | H | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for D in args.head_dims:
    ok = {}
    for impl in impls:
      try:
        err = verify(impl, dtype, D, use_fla, args.segments)
        ok[impl] = err <= VERIFY_TOL
        print(f"# verify {impl} D={D}: max relative error {err:.2e}"
              f"{'' if ok[impl] else '  FAILED: not timed'}")
      except Exception as e:
        ok[impl] = False
        print(f"# verify {impl} D={D}: {type(e).__name__}: {str(e)[:200]}  (not timed)")
    for T in args.seq_lens:
      B = max(1, args.tokens // T)
      H = max(1, args.width // D)
      q, k, v, lf, do = make_inputs(B, T, H, D, dtype)
      seg = segment_ids(B, T, args.segments)
      fl = flops_fwd(B, T, H, D)
      for impl in impls:
        if not ok[impl]:
          continue
        if impl in ("xla", "plain_xla") and T > args.xla_max_t:
          print(f"| {impl} | {T} | {D} | {B} | {H} | skipped (T > --xla-max-t) | | | |")
          continue
        try:
          if impl == "fla":
            fwd, fwd_bwd = fla_fns(q, k, v, lf, do)
            tf, tb = time_torch(fwd, args.reps), time_torch(fwd_bwd, args.reps)
          else:
            f, fb = jax_attention(impl, segments=seg)
            tf = time_jax(f, (q, k, v, lf), args.reps)
            tb = time_jax(fb, (q, k, v, lf, do), args.reps)
        except Exception as e:
          print(f"| {impl} | {T} | {D} | {B} | {H} | error: {type(e).__name__}: {str(e)[:120]} | | | |")
          continue
        rows.append((impl, T, D, tf, tb))
        print(f"| {impl} | {T} | {D} | {B} | {H} | {tf * 1e3:.3f} | {fl / tf / 1e12:.3g} | "
              f"{tb * 1e3:.3f} | {3.5 * fl / tb / 1e12:.3g} |", flush=True)
  return rows


def overhead_table(rows, baseline="plain_auto"):
  """Each forgetting implementation's time over the plain baseline's at the same T and D."""
  base = {(T, D): (tf, tb) for impl, T, D, tf, tb in rows if impl == baseline}
  gated = [r for r in rows if r[0] in api.IMPLS and (r[1], r[2]) in base]
  if not gated:
    return
  print(f"\n## forgetting over plain: time / {baseline} time (the Transformer's attention)")
  print("| impl | T | D | fwd ratio | fwd+bwd ratio |")
  print("|---|---|---|---|---|")
  for impl, T, D, tf, tb in gated:
    bf, bb = base[(T, D)]
    print(f"| {impl} | {T} | {D} | {tf / bf:.2f} | {tb / bb:.2f} |")


def pruning_table(args):
  dtype = jnp.dtype(args.dtype)
  D = args.prune_head_dim
  H = max(1, args.width // D)
  print(f"\n## pruning: {args.dtype}, D = {D}, H = {H}, B = 1, decay lengths 2..T per head, "
        "Pruning(log_tolerance=-10, qk_bound='auto')")
  print("| T | kept tiles | kept fraction | unpruned fwd+bwd ms | pruned fwd+bwd ms | speedup |")
  print("|---|---|---|---|---|---|")
  for T in args.prune_seq_lens:
    q, k, v, lf, do = make_inputs(1, T, H, D, dtype, seed=2)
    pr = Pruning(log_tolerance=-10.0, qk_bound="auto")
    _, stats = jax.jit(lambda q, k, v, lf: api._forgetting_attention(
        q, k, v, lf, segment_ids=None, sm_scale=None, pruning=pr, impl=args.prune_impl,
        block_sizes=None, interpret=False, return_stats=True))(q, k, v, lf)
    kept = int(np.sum(stats.kept_tiles))
    total = int(np.sum(stats.total_tiles))
    times = []
    for p in (None, pr):
      _, fb = jax_attention(args.prune_impl, pruning=p)
      times.append(time_jax(fb, (q, k, v, lf, do), args.reps))
    print(f"| {T} | {kept}/{total} | {kept / total:.3f} | {times[0] * 1e3:.3f} | "
          f"{times[1] * 1e3:.3f} | {times[0] / times[1]:.2f}x |", flush=True)


def tune_table(args):
  """Forward and forward+backward time of pallas_gpu over block configurations."""
  dtype = jnp.dtype(args.dtype)
  configs = [(128, 64, 64, 64, None, None), (128, 128, 64, 64, None, None),
             (128, 64, 64, 64, 4, 3), (128, 64, 64, 64, 8, 2), (128, 64, 128, 64, 8, 2),
             (64, 64, 64, 64, 4, 3), (128, 64, 64, 128, 8, 2), (128, 64, 32, 64, 4, 3),
             (128, 128, 128, 128, 8, 2), (128, 64, 128, 128, 8, 2)]
  print(f"\n## tune: pallas_gpu, {args.dtype}, T = {args.tune_t}, H*D = {args.width}")
  print("| D | block q,k | bwd q,k | warps | stages | fwd ms | fwd+bwd ms |")
  print("|---|---|---|---|---|---|---|")
  for D in args.head_dims:
    T = args.tune_t
    B, H = max(1, args.tokens // T), max(1, args.width // D)
    q, k, v, lf, do = make_inputs(B, T, H, D, dtype)
    for bq, bk, bqb, bkb, w, s in configs:
      bs = BlockSizes(bq, bk, bqb, bkb, w, s)
      try:
        f, fb = jax_attention("pallas_gpu", block_sizes=bs)
        tf = time_jax(f, (q, k, v, lf), args.reps)
        tb = time_jax(fb, (q, k, v, lf, do), args.reps)
        res = f"{tf * 1e3:.3f} | {tb * 1e3:.3f}"
      except Exception as e:
        res = f"error {type(e).__name__}: {str(e)[:100]} |"
      print(f"| {D} | {bq},{bk} | {bqb},{bkb} | {w} | {s} | {res} |", flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
  p.add_argument("--tune", action="store_true", help="only the block-size sweep")
  p.add_argument("--no-speed", action="store_true")
  p.add_argument("--no-pruning", action="store_true")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  p.add_argument("--impls", nargs="+",
                 default=["pallas_gpu", "pallas_tpu", "xla", "plain_auto", "plain_pallas_gpu",
                          "plain_pallas_tpu", "plain_xla", "cudnn", "fla"])
  p.add_argument("--segments", type=int, default=0,
                 help="packed documents per row (segment ids); 0: none")
  p.add_argument("--tokens", type=int, default=16384, help="B * T")
  p.add_argument("--width", type=int, default=2048, help="H * D")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--xla-max-t", type=int, default=4096)
  p.add_argument("--prune-seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  p.add_argument("--prune-head-dim", type=int, default=128)
  p.add_argument("--prune-impl", default="pallas_gpu")
  p.add_argument("--tune-t", type=int, default=16384)
  args = p.parse_args(argv)
  backend = jax.default_backend()
  if args.quick:
    args.seq_lens, args.head_dims, args.tokens, args.width = [128, 256], [64], 256, 128
    args.prune_seq_lens, args.prune_head_dim, args.reps = [512], 64, 2
    args.dtype = "float32" if backend != "gpu" else args.dtype
  impls = [i for i in args.impls if i in PORTABLE + ON_BACKEND.get(backend, ())] or ["xla"]
  if args.segments:
    impls = [i for i in impls if i not in NO_SEGMENTS] or ["xla"]
  if backend != "gpu":
    args.prune_impl = "xla"
  use_fla = "fla" in impls and fla_available()
  if "fla" in impls and not use_fla:
    impls.remove("fla")
  print(f"# jax {jax.__version__}, backend {backend}, device {jax.devices()[0].device_kind}")
  if args.tune:
    tune_table(args)
    return
  if not args.no_speed:
    overhead_table(speed_table(args, impls, use_fla))
  if not args.no_pruning:
    pruning_table(args)


if __name__ == "__main__":
  main()

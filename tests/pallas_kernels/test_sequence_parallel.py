"""Sequence-parallel forgetting attention on 8 simulated CPU devices: every strategy and
P in {2, 4, 8} against the float64 reference on the whole natural-order sequence (output,
lse and the gradients of q, k, v and log f), the global cumulative gate against the
single-device one, ACP's global threshold, meshes with a batch axis, the transfers in the
lowered program, and bad input."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import BlockSizes, Pruning
from pallas_kernels.forgetting_attention import common, forgetting_attention, pruning, registry
from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference
from pallas_kernels.sequence_parallel import (LAYOUTS, STRATEGIES, Layout, cumsum, permute,
                                              sequence_parallel_attention, strategy_layout,
                                              unpermute)
from pallas_kernels.sequence_parallel.traffic import collective_traffic
from tests.kernel_utils import make_log_fgate
from tests.tolerances import FLOAT64_RTOL, TOLERANCES, assert_close

TILES = BlockSizes(16, 16)


def _mesh(shape, names):
  n = int(np.prod(shape))
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def _inputs(B, S, Hq, Hkv, D, gate, seed, segments=None, zero_gate_at=None):
  rng = np.random.default_rng(seed)
  x = {"q": rng.normal(size=(B, S, Hq, D)), "k": rng.normal(size=(B, S, Hkv, D)),
       "v": rng.normal(size=(B, S, Hkv, D)), "do": rng.normal(size=(B, S, Hq, D)),
       "dlse": rng.normal(size=(B, Hq, S))}
  x = {n: np.asarray(a, np.float32) for n, a in x.items()}
  lf = make_log_fgate(rng, B, S, Hq, gate)
  if zero_gate_at is not None:
    lf[:, zero_gate_at, 0] = -np.inf
  x["log_fgate"] = lf
  x["segment_ids"] = None if segments is None else np.broadcast_to(
      np.repeat(np.arange(len(segments)), segments).astype(np.int32), (B, S)).copy()
  return x


def _reference(x, prune_threshold=None):
  """o, lse and the gradients of sum(o do) + sum(lse dlse), float64."""
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    thr = None if prune_threshold is None else f64(prune_threshold)

    def f(q, k, v, lf):
      return forgetting_attention_reference(q, k, v, lf, segment_ids=x["segment_ids"],
                                            prune_threshold=thr)

    (o, lse), vjp = jax.vjp(f, *(f64(x[n]) for n in ("q", "k", "v", "log_fgate")))
    grads = vjp((f64(x["do"]), f64(x["dlse"])))
    return [np.asarray(a) for a in (o, lse, *grads)]


@functools.lru_cache(maxsize=None)
def _compiled(strategy, mesh_shape, mesh_names, S, batch_axes, pruned, with_segments,
              impl="auto", ring_steps=None, stripe=1, tiles=TILES, interpret=False):
  """A jitted function of natural-order inputs: o, lse and the gradients of
  sum(o do) + sum(lse dlse) through ``strategy``, all in natural order, plus the tile counts."""
  mesh = _mesh(mesh_shape, mesh_names)
  layout = strategy_layout(strategy, S, mesh.shape["context"], stripe)
  prune = Pruning(log_tolerance=-10.0) if pruned else None

  def run(q, k, v, lf, seg):
    o, stats = sequence_parallel_attention(
        *(permute(a, layout) for a in (q, k, v, lf)), mesh=mesh, strategy=strategy,
        batch_axes=batch_axes, segment_ids=None if seg is None else permute(seg, layout),
        pruning=prune, impl=impl, block_sizes=tiles, return_stats=True, ring_steps=ring_steps,
        stripe=stripe, interpret=interpret)
    return unpermute(o, layout), unpermute(stats.lse, layout, axis=2), stats

  def f(q, k, v, lf, seg, do, dlse):
    def loss(q, k, v, lf):
      o, lse, stats = run(q, k, v, lf, seg)
      return (jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(lse * dlse),
              (o, lse, stats))

    (_, (o, lse, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        q, k, v, lf)
    return (o, lse, *grads), stats

  return jax.jit(f)


def _run(strategy, x, mesh_shape=(8,), mesh_names=("context",), batch_axes=None,
         pruned=False, impl="auto", ring_steps=None, stripe=1, dtype=np.float32, tiles=TILES,
         interpret=False):
  """``x`` through ``strategy`` with q, k, v and do in ``dtype`` (``x``'s own arrays are
  rounded to it in place, so that the float64 reference sees the same inputs)."""
  S = x["q"].shape[1]
  for n in ("q", "k", "v", "do"):
    x[n] = np.asarray(jnp.asarray(x[n], dtype).astype(jnp.float32))
  f = _compiled(strategy, mesh_shape, mesh_names, S, batch_axes, pruned,
                x["segment_ids"] is not None, impl, ring_steps, stripe, tiles, interpret)
  seg = None if x["segment_ids"] is None else jnp.asarray(x["segment_ids"])
  cast = lambda n: jnp.asarray(x[n], dtype)
  return f(cast("q"), cast("k"), cast("v"), jnp.asarray(x["log_fgate"]), seg, cast("do"),
           jnp.asarray(x["dlse"]))


NAMES = ("o", "lse", "dq", "dk", "dv", "dlog_fgate")


def _assert_matches(got, want, what, dtype=np.float32):
  for name, a, r in zip(NAMES, got, want):
    # lse is a float32 computation on the rounded inputs whatever their dtype; o and every
    # gradient go through products in the inputs' dtype.
    dt = np.float32 if name == "lse" else dtype
    assert_close(np.asarray(a, np.float64), r, dt, f"{what} {name}")


# ---------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_layout_round_trip_and_increasing_positions(name, num_shards):
  stripe = 2 if name == "striped" and num_shards == 4 else 1
  layout = Layout(name, 64, num_shards, stripe)
  x = jnp.arange(3 * 64).reshape(3, 64)
  np.testing.assert_array_equal(unpermute(permute(x, layout), layout), x)
  np.testing.assert_array_equal(np.sort(layout.order), np.arange(64))
  pos = layout.shard_positions()
  assert np.all(np.diff(pos, axis=1) > 0)
  runs = pos.reshape(num_shards, -1, layout.run_length)
  assert np.all(np.diff(runs, axis=2) == 1)  # runs of consecutive positions


def test_layout_orders():
  zz = Layout("zigzag", 16, 4).shard_positions()  # 8 chunks of 2
  np.testing.assert_array_equal(zz[0], [0, 1, 14, 15])
  np.testing.assert_array_equal(zz[3], [6, 7, 8, 9])
  st = Layout("striped", 8, 4).shard_positions()
  np.testing.assert_array_equal(st[1], [1, 5])  # token i on device i mod P
  np.testing.assert_array_equal(Layout("striped", 16, 2, stripe=4).shard_positions()[1],
                                [4, 5, 6, 7, 12, 13, 14, 15])
  np.testing.assert_array_equal(Layout("contiguous", 8, 2).shard_positions()[1], [4, 5, 6, 7])


@pytest.mark.parametrize("args,match", [
    (("zigzag", 24, 8), "sequence length 24 must be divisible by 2 x the number of shards = 16"),
    (("contiguous", 10, 4), "sequence length 10 must be divisible by the number of shards = 4"),
    (("striped", 16, 4, 3), "divisible by the number of shards x stripe = 12"),
    (("ring", 16, 4), "layout must be one of"),
    (("zigzag", 16, 4, 2), "stripe applies to the 'striped' layout only"),
    (("contiguous", 16, 0), "number of shards must be >= 1"),
])
def test_layout_refuses_what_cannot_split(args, match):
  with pytest.raises(ValueError, match=match):
    Layout(*args)


# -------------------------------------------------------------------- the global gate c


@pytest.mark.parametrize("name", LAYOUTS)
def test_global_cumsum_equals_single_device_at_128k(name):
  """c itself over 8 devices at 131072 tokens with log f ~ -1 (|c| ~ 1.3e5), where a float32
  cumulative sum would be off by ~1e-2: hi + lo equals the single-device double-float c to
  float32 relative precision of the decays that matter (|error| << 2^-24 |c|), and the
  reverse scan (the gradient of log f) equals a float64 suffix sum to float32 precision."""
  S, P_ = 131072, 8
  layout = Layout(name, S, P_, 16 if name == "striped" else 1)
  rng = np.random.default_rng(1)
  lf = jnp.asarray(-rng.uniform(0.5, 1.5, size=(1, S, 2)), jnp.float32)
  dc = jnp.asarray(rng.normal(size=(1, S, 2)), jnp.float32)
  mesh = _mesh((P_,), ("context",))
  spec = P(None, "context")

  def local(lf, dc):
    hi, lo = cumsum.global_cumsum(lf, layout, "context")
    return hi, lo, cumsum.global_reverse_cumsum(dc, layout, "context")

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=(spec,) * 3,
                             check_vma=False))
  hi, lo, rev = (np.asarray(unpermute(a, layout), np.float64)
                 for a in fn(permute(lf, layout), permute(dc, layout)))
  want_hi, want_lo = (np.asarray(a, np.float64) for a in common.compensated_cumsum(lf, axis=1))
  exact = np.cumsum(np.asarray(lf, np.float64), axis=1)
  got, want = hi + lo, want_hi + want_lo
  assert np.max(np.abs(want - exact) / np.abs(exact)) < 2.0 ** -40  # the oracle itself
  assert np.max(np.abs(got - exact) / np.abs(exact)) < 2.0 ** -40
  rev_exact = np.cumsum(np.asarray(dc, np.float64)[:, ::-1], axis=1)[:, ::-1]
  assert_close(rev, rev_exact, np.float32, "reverse scan")


# ----------------------------------------------------------- against the float64 reference


# Hq = 8 and Hkv = 2: GQA 4:1, and Ulysses at P = 4 and 8 repeats kv heads (Hkv < P).
# Segments: a document of 70 tokens spans 3 to 5 contiguous shards at P = 4 and 8.
SEGMENTS = (30, 70, 28)


@pytest.mark.parametrize("num_shards", [2, 4, 8])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_matches_reference(strategy, num_shards):
  x = _inputs(1, 128, 8, 2, 16, "medium", seed=num_shards, segments=SEGMENTS,
              zero_gate_at=50)
  got, stats = _run(strategy, x, mesh_shape=(num_shards,))
  _assert_matches(got, _reference(x), f"{strategy} P={num_shards}")
  assert stats.ring_steps == (0 if strategy == "ulysses" else num_shards)


@pytest.mark.parametrize("strategy,dtype,stripe", [("zigzag", jnp.bfloat16, 1),
                                                   ("striped", jnp.float16, 4)])
def test_half_precision_and_wide_stripes(strategy, dtype, stripe):
  """bfloat16 and float16 inputs (float32 accumulation and merge) at their dtype's
  tolerance; stripes of 4 tokens."""
  x = _inputs(1, 128, 4, 2, 16, "medium", seed=9, segments=SEGMENTS)
  got, _ = _run(strategy, x, mesh_shape=(4,), dtype=dtype, stripe=stripe)
  _assert_matches(got, _reference(x), f"{strategy} {np.dtype(dtype).name}", np.dtype(dtype))


def test_strong_gates_long_sequence():
  """log f < -8: each token nearly forgets its past; the anchored backward keeps the
  gradients' relative precision across devices."""
  x = _inputs(1, 1024, 2, 1, 32, "strong", seed=3)
  got, _ = _run("zigzag", x, mesh_shape=(4,))  # striped with strong gates: the Pallas test
  _assert_matches(got, _reference(x), "zigzag")


@functools.lru_cache(maxsize=None)
def _pallas_ring_case(gate):
  """S = 512 over P = 4: 128-token chunks (one TPU kv tile; zigzag's two runs of 64 share
  it), a document spanning all four devices and a zero gate; inputs and their reference."""
  x = _inputs(1, 512, 2, 1, 32, gate, seed=11, segments=(120, 280, 112), zero_gate_at=200)
  return x, _reference(x)


# The Pallas chunk kernels in interpret mode: 16 x 16 tiles for pallas_gpu; for pallas_tpu
# one 128 x 128 tile per chunk pair, which keeps the TPU interpreter's steps few
# (test_chunks.py runs its smallest tiles on every kind of chunk pair).
PALLAS_RING_TILES = {"pallas_gpu": BlockSizes(16, 16), "pallas_tpu": BlockSizes(128, 128)}


# One layout and gate per implementation (the suite's time; test_chunks.py covers every
# kind of chunk pair for each): pallas_gpu zigzag with medium gates, pallas_tpu striped
# with strong ones.
@pytest.mark.parametrize("impl,strategy,gate", [("pallas_gpu", "zigzag", "medium"),
                                                ("pallas_tpu", "striped", "strong")])
def test_pallas_chunk_kernels_in_the_ring(impl, strategy, gate):
  """The ring on each Pallas implementation's chunk kernels at P = 4 equals the float64
  reference: the partial results merge, dk, dv, dc ride home, positions and the global c
  place every chunk; with strong gates (log f < -8) every gradient keeps float32 relative
  precision through the exact-g dq."""
  x, want = _pallas_ring_case(gate)
  got, stats = _run(strategy, dict(x), mesh_shape=(4,), impl=impl,
                    tiles=PALLAS_RING_TILES[impl], interpret=True)
  _assert_matches(got, want, f"{impl} {strategy}")
  assert stats.ring_steps == 4


def test_reference_ring_is_float64():
  """impl="reference" in the zigzag ring (P = 2) with float64 inputs (x64): its float64 chunk
  functions, merged and accumulated in float64 on the double-float global c, equal the
  single-device float64 reference to float64 precision (GQA, segments across devices, a zero
  gate): output, lse and every gradient. A float32 merge would be off by ~1e-7."""
  x = _inputs(1, 64, 4, 2, 16, "medium", seed=12, segments=(20, 30, 14), zero_gate_at=40)
  x["log_fgate"] = x["log_fgate"].astype(np.float64)
  with jax.enable_x64(True):
    got, stats = _run("zigzag", x, mesh_shape=(2,), impl="reference", dtype=np.float64)
    got = [np.asarray(a) for a in got]
  assert stats.ring_steps == 2
  for name, a, r in zip(NAMES, got, _reference(x)):
    assert a.dtype == np.float64, name
    assert_close(a, r, np.float64, f"reference zigzag {name}")


def test_data_and_context_mesh():
  """(data 2, context 4): the batch split over 'data', the sequence over 'context'."""
  x = _inputs(2, 128, 4, 2, 16, "spread", seed=4, segments=SEGMENTS)
  got, _ = _run("zigzag", x, mesh_shape=(2, 4), mesh_names=("data", "context"),
                batch_axes="data")
  _assert_matches(got, _reference(x), "zigzag")


# --------------------------------------------------------------------------------- ACP


def _single_device_threshold(x):
  return pruning.threshold(jnp.asarray(x["q"]), jnp.asarray(x["k"]), Pruning(log_tolerance=-10.0),
                           x["q"].shape[-1] ** -0.5)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_pruning_prunes_what_one_device_prunes(strategy):
  """The global threshold (bounds reduced over the axis, S the whole length) equals the
  single-device one, so the pruned function is the reference's with that threshold; strong
  gates make most tiles prunable and the kept tiles fall (Ulysses: the single-device op's
  own tiles)."""
  x = _inputs(1, 256, 4, 2, 16, "strong", seed=5)
  delta = _single_device_threshold(x)
  assert np.all(np.isfinite(np.asarray(delta)))
  got, stats = _run(strategy, x, mesh_shape=(4,), pruned=True)
  _assert_matches(got, _reference(x, prune_threshold=delta), strategy)
  kept, total = np.asarray(stats.kept_tiles), np.asarray(stats.total_tiles)
  # A striped tile of 16 local tokens spans 16 P positions of decay, so fewer tiles fall
  # below the threshold than in the contiguous layouts.
  assert np.all(kept < (total if strategy == "striped" else total / 2)), (kept, total)


@pytest.mark.parametrize("gate,steps_run", [("strong", 2), ("weak", 8)])
def test_truncated_ring_equals_full_ring(gate, steps_run):
  """ring_steps=2 on 8 devices: with strong gates ACP prunes every chunk pair two or more
  chunks apart, every device sees it, and the ring stops after 2 steps; with weak gates it
  does not, and the rest of the ring runs. Both equal the reference with the single-device
  threshold, and the full ring."""
  x = _inputs(1, 256, 4, 2, 16, gate, seed=8)
  delta = _single_device_threshold(x)
  got, stats = _run("ring", x, pruned=True, ring_steps=2)
  assert int(stats.ring_steps) == steps_run
  _assert_matches(got, _reference(x, prune_threshold=delta), f"ring_steps=2, {gate}")
  full, _ = _run("ring", x, pruned=True)
  for name, a, b in zip(NAMES, got, full):
    assert_close(np.asarray(a), np.asarray(b, np.float64), np.float32, f"truncated vs full {name}")


def test_global_threshold_is_the_single_device_threshold():
  x = _inputs(2, 64, 4, 2, 16, "medium", seed=6)
  x["q"][1, 37, 2] *= 50.0  # the largest norm on one device only
  mesh = _mesh((4,), ("context",))
  prune = Pruning(log_tolerance=-7.0)

  def local(q, k):
    return pruning.threshold(q, k, prune, 0.25, num_keys=64, axis_name="context")

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "context"),) * 2, out_specs=P(),
                     check_vma=False)
  got = fn(jnp.asarray(x["q"]), jnp.asarray(x["k"]))
  want = pruning.threshold(jnp.asarray(x["q"]), jnp.asarray(x["k"]), prune, 0.25)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_nan_input_with_pruning_is_nan_not_zeros():
  x = _inputs(1, 128, 8, 2, 16, "strong", seed=7)
  x["k"][0, 100, 1, 3] = np.nan  # on one device only
  (o, *_), _ = _run("zigzag", x, mesh_shape=(4,), pruned=True)
  o = np.asarray(o)
  assert np.all(np.isnan(o[0, 100:, 4:]))  # the heads of kv head 1, from the NaN key on
  assert np.all(np.isfinite(o[0, :, :4]))


# ------------------------------------------------------------ the program: transfers, lowering


def _lowered(strategy, num_shards, S=128, Hq=8, Hkv=2, D=16, platform=None, impl="auto",
             dtype=jnp.bfloat16):
  mesh = _mesh((num_shards,), ("context",))
  sd = jax.ShapeDtypeStruct
  shapes = (sd((1, S, Hq, D), dtype), sd((1, S, Hkv, D), dtype), sd((1, S, Hkv, D), dtype),
            sd((1, S, Hq), jnp.float32), sd((1, S), jnp.int32))

  def f(q, k, v, lf, seg):
    def loss(q, k, v, lf):
      o = sequence_parallel_attention(q, k, v, lf, mesh=mesh, strategy=strategy,
                                      segment_ids=seg, impl=impl)
      return jnp.sum(o.astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, lf)

  traced = jax.jit(f).trace(*shapes)
  return traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


def test_ring_transfers_kv_in_gqa_form_once_per_step():
  """Forward + backward on P = 4, read from the compiled program (loops times their trip
  counts): three rings of P - 1 transfers of the chunk (k, v, c hi, c lo, segment ids,
  positions) and P transfers of the travelling dk, dv, dc; k and v move with their Hkv = 2
  heads, never repeated to Hq = 8. Nothing else is sent but the c scan's gathered run
  totals."""
  compiled = _lowered("ring", 4, dtype=jnp.float32).compile()
  traffic = collective_traffic(compiled.as_text(), 4)
  L = 128 // 4
  assert traffic["permute"].shapes == {
      f"f32[1,{L},2,16]": 3 * 3 * 2 + 4 * 2,  # k, v: 3 rings x 3 steps; dk, dv: 4 shifts
      f"f32[1,{L},8]": 3 * 3 * 2 + 4,  # c hi, lo; the travelling dc
      f"s32[1,{L}]": 3 * 3,  # segment ids
      f"s32[{L}]": 3 * 3,  # positions
  }, traffic["permute"].shapes
  assert set(traffic) == {"permute", "all_gather"}
  # The c scan gathers 2 x R run totals per device, and its reverse R: B Hq floats each.
  assert traffic["all_gather"].bytes < 1024


def _temp_bytes(fn, S, H=8, Hkv=2, D=32):
  sd = jax.ShapeDtypeStruct
  shapes = (sd((1, S, H, D), jnp.bfloat16), sd((1, S, Hkv, D), jnp.bfloat16),
            sd((1, S, Hkv, D), jnp.bfloat16), sd((1, S, H), jnp.float32))
  g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3)))
  return g.trace(*shapes).lower().compile().memory_analysis().temp_size_in_bytes


def test_memory_per_device_falls_with_the_devices():
  """Forward + backward temporary memory per device (compiled memory analysis): going from
  S to 2S adds under a quarter of what it adds on one device with 8 devices (ideal: 1/8):
  the ring keeps only the device's own chunk and the one in flight, nothing gathered."""
  mesh = _mesh((8,), ("context",))
  one = lambda q, k, v, lf: forgetting_attention(q, k, v, lf, impl="xla")
  ring = lambda q, k, v, lf: sequence_parallel_attention(q, k, v, lf, mesh=mesh,
                                                         strategy="zigzag")
  grow_one = _temp_bytes(one, 8192) - _temp_bytes(one, 4096)
  grow_ring = _temp_bytes(ring, 8192) - _temp_bytes(ring, 4096)
  assert 0 < grow_ring < grow_one / 4, (grow_ring, grow_one)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_gpu_and_tpu_from_the_cpu(platform):
  """Forward and backward lower for both accelerators: the ring on the XLA chunk kernels and
  on the platform's Pallas ones, and Ulysses with the platform's Pallas kernels inside
  shard_map. A Pallas impl lowered for another platform names itself."""
  text = _lowered("ulysses", 4, platform=platform).as_text()
  kernel = {"cuda": r"__gpu\$xla\.gpu\.triton", "tpu": r"custom_call @tpu_custom_call"}
  assert len(re.findall(kernel[platform], text)) == 3, platform  # forward, dQ, dK/dV
  _lowered("zigzag", 4, platform=platform)
  impl, other = {"cuda": ("pallas_gpu", "pallas_tpu"),
                 "tpu": ("pallas_tpu", "pallas_gpu")}[platform]
  text = _lowered("zigzag", 4, platform=platform, impl=impl).as_text()
  # Forward, row terms, exact dq and dK/dV (each where the ring's loops trace a step).
  assert len(re.findall(kernel[platform], text)) >= 4, impl
  for name in ("fwd", "row_terms", "dq_exact", "dkv"):
    assert f"forgetting_attention_{name}" in text, (impl, name)
  backend = "GPU" if other == "pallas_gpu" else "TPU"
  with pytest.raises(ValueError, match=f"impl='{other}' needs a {backend} backend"):
    _lowered("zigzag", 4, platform=platform, impl=other)


# ------------------------------------------------------------------------------ bad input


def _args(S=64, Hq=4, Hkv=2):
  return (jnp.ones((1, S, Hq, 16)), jnp.ones((1, S, Hkv, 16)), jnp.ones((1, S, Hkv, 16)),
          -jnp.ones((1, S, Hq)))


@pytest.mark.parametrize("kwargs,args,match", [
    (dict(strategy="zigzag"), _args(S=76), "sequence length 76 must be divisible by 2 x the number of shards = 8"),
    (dict(strategy="tree"), _args(), "strategy must be one of"),
    (dict(strategy="ulysses"), _args(Hq=6, Hkv=2), r"q heads \(6\) to be divisible"),
    (dict(strategy="ulysses"), _args(Hq=12, Hkv=3), r"k/v heads \(3\) to divide"),
    (dict(strategy="ring", impl="triton"), _args(), "impl='triton' has no chunk kernels"),
    (dict(strategy="ring", axis_name="seq"), _args(), "axis_name 'seq' is not an axis"),
    (dict(strategy="ring", batch_axes="data"), _args(), "batch_axes 'data' is not an axis"),
    (dict(strategy="ring", segment_ids=jnp.zeros((1, 63), jnp.int32)), _args(),
     "segment_ids must have shape"),
    (dict(strategy="ring", mesh="context"), _args(), "mesh must be a jax.sharding.Mesh"),
])
def test_bad_input_names_argument(kwargs, args, match):
  kwargs = dict(dict(mesh=_mesh((4,), ("context",))), **kwargs)
  with pytest.raises(ValueError, match=match):
    sequence_parallel_attention(*args, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="zigzag", ring_steps=2), "ring_steps applies to strategy='ring' only"),
    (dict(strategy="ring", ring_steps=2), "ring_steps needs pruning"),
    (dict(strategy="ring", ring_steps=5, pruning=Pruning()), r"ring_steps must be an integer in \[1, 4\]"),
    (dict(strategy="ring", ring_steps=2.0, pruning=Pruning()), "ring_steps must be an integer"),
])
def test_bad_ring_steps(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sequence_parallel_attention(*_args(), mesh=_mesh((4,), ("context",)), **kwargs)


@pytest.mark.parametrize("backend,impl", [("gpu", "pallas_gpu"), ("tpu", "pallas_tpu"),
                                          ("cpu", "xla")])
def test_auto_ring_picks_the_default_backends_kernels(monkeypatch, backend, impl):
  """impl='auto' in a ring strategy is the default backend's Pallas implementation with
  chunk kernels (xla on a CPU), read from the registry."""
  from pallas_kernels.sequence_parallel import api as sp_api
  monkeypatch.setattr(sp_api.jax, "default_backend", lambda: backend)
  assert sp_api._auto_chunk_impl() == impl


def test_queries_must_cover_the_sequence():
  q, k, v, lf = _args()
  with pytest.raises(ValueError, match="q length 32 must equal k length 64"):
    sequence_parallel_attention(q[:, :32], k, v, lf, mesh=_mesh((4,), ("context",)))


def test_registry_lists_chunk_impls():
  assert set(registry.chunk_impls()) == {"reference", "xla", "pallas_gpu", "pallas_tpu"}
  assert set(registry.BLOCKWISE) == {"xla", "pallas_gpu", "pallas_tpu"}
  for name in registry.chunk_impls():
    assert hasattr(registry.module(name), "backward_chunk"), name


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the refusal on a CPU")
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_ring_refuses_another_backend(impl):
  """Called on CPU arrays without interpret=True, a Pallas impl's ring refuses at once, as
  the single-device op does; under jit the lowering refuses (test_lowers_...)."""
  backend = "GPU" if impl == "pallas_gpu" else "TPU"
  with pytest.raises(ValueError, match=f"impl='{impl}' needs a {backend} backend"):
    sequence_parallel_attention(*_args(), mesh=_mesh((4,), ("context",)), strategy="zigzag",
                                impl=impl)
  with pytest.raises(ValueError, match=f"impl='{impl}' needs a {backend} backend"):
    jax.jit(functools.partial(sequence_parallel_attention, mesh=_mesh((4,), ("context",)),
                              strategy="zigzag", impl=impl))(*_args())

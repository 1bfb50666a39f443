"""Bad input gets a ValueError that names the argument; the op lowers for other platforms."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, Pruning, QKNormBound, forgetting_attention
from pallas_kernels.forgetting_attention import pruning, registry
from tests.kernel_utils import interpret_for, make_inputs, reference_f64
from tests.tolerances import assert_close


def _args(B=1, T=8, S=8, Hq=4, Hkv=2, D=16, dtype=jnp.float32):
  q = jnp.ones((B, T, Hq, D), dtype)
  k = jnp.ones((B, S, Hkv, D), dtype)
  v = jnp.ones((B, S, Hkv, D), dtype)
  lf = -jnp.ones((B, S, Hq), jnp.float32)
  return q, k, v, lf


@pytest.mark.parametrize("change,match", [
    (lambda a: (a[0][0], *a[1:]), "q must have shape"),
    (lambda a: (a[0], a[1][:, :, :1], *a[2:]), "k and v must have the same shape"),
    (lambda a: (a[0][:, :, :3], *a[1:]), r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
    (lambda a: (a[0], a[1][..., :8], a[2][..., :8], a[3]), "k has head dim 8"),
    (lambda a: (*a[:3], a[3].astype(jnp.bfloat16)), "log_fgate must be float32"),
    (lambda a: (*a[:3], a[3][:, :4]), "log_fgate must have shape"),
    (lambda a: (*a[:3], -a[3]), "log_fgate must be <= 0"),
    (lambda a: (a[0], a[1][:, :4], a[2][:, :4], a[3][:, :4]), "must be >= q length"),
    (lambda a: (a[0].astype(jnp.bfloat16), *a[1:]), "q, k, v must share one dtype"),
    (lambda a: tuple(x.astype(jnp.int32) for x in a[:3]) + (a[3],), "q dtype must be one of"),
])
def test_bad_input_names_argument(change, match):
  with pytest.raises(ValueError, match=match):
    forgetting_attention(*change(_args()), impl="reference")


def test_bad_options():
  args = _args()
  with pytest.raises(ValueError, match="impl must be one of"):
    forgetting_attention(*args, impl="cudnn")
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    forgetting_attention(*args, segment_ids=jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must be an integer"):
    forgetting_attention(*args, segment_ids=jnp.zeros((1, 8), jnp.float32))
  with pytest.raises(ValueError, match="block_sizes.block_q must be a positive power of two"):
    BlockSizes(block_q=48)
  with pytest.raises(ValueError, match="pruning.log_tolerance"):
    Pruning(log_tolerance=1.0)
  with pytest.raises(ValueError, match="head dim must be <= 256"):
    forgetting_attention(*_args(D=320), impl="reference")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal on a non-GPU backend")
def test_pallas_gpu_refuses_non_gpu_backend():
  with pytest.raises(ValueError, match="impl='pallas_gpu' needs a GPU backend"):
    forgetting_attention(*_args(), impl="pallas_gpu")


@pytest.mark.parametrize("impl", registry.BLOCKWISE)
def test_float32_inputs_with_x64_enabled(impl):
  """A program that turns jax_enable_x64 on (Python ints become int64) still gets the
  float32 result: the kernels' index arithmetic stays int32."""
  inp = make_inputs(1, 40, 56, 2, 1, 32, jnp.float32, gate="medium", segments=2, seed=3)
  tiles = BlockSizes(16, 128) if impl == "pallas_tpu" else BlockSizes(16, 16)
  with jax.enable_x64(True):
    def loss(q, k, v, lf):
      o = forgetting_attention(q, k, v, lf, segment_ids=inp.segment_ids, impl=impl,
                               block_sizes=tiles, pruning=Pruning(),
                               interpret=interpret_for(impl))
      return jnp.sum(o * inp.do), o

    (dq, dk, dv, dlf), o = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        inp.q, inp.k, inp.v, inp.log_fgate)
  ref = reference_f64(inp, prune_threshold=np.asarray(
      pruning.threshold(inp.q, inp.k, Pruning(), 32 ** -0.5)))
  for name, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv), ("dlog_fgate", dlf)):
    assert x.dtype == jnp.float32, name
    assert_close(x, ref[name], jnp.float32, name)


# ----------------------------------------------------------------------------- degenerate input


@pytest.mark.parametrize("shapes,match", [
    (dict(D=0), r"q head dim must be >= 1"),
    (dict(Hq=0, Hkv=0), r"k must have at least one head"),
    (dict(Hq=0), r"q must have at least one head"),
    (dict(B=0), r"q batch must be >= 1"),
], ids=["D0", "heads0", "q-heads0", "B0"])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_empty_dims_name_the_argument(shapes, match, impl):
  with pytest.raises(ValueError, match=match):
    forgetting_attention(*_args(**shapes), impl=impl)


def test_block_sizes_accept_integral_values_only():
  bs = BlockSizes(16.0, np.int64(32), block_q_bwd=np.float32(64.0), num_warps=4.0)
  assert (bs.block_q, bs.block_k, bs.block_q_bwd, bs.num_warps) == (16, 32, 64, 4)
  assert all(type(x) is int for x in (bs.block_q, bs.block_k, bs.block_q_bwd, bs.num_warps))
  assert bs == BlockSizes(16, 32, 64, num_warps=4) and hash(bs) == hash(BlockSizes(16, 32, 64, num_warps=4))
  for kw, field in ((dict(block_q=16.5), "block_q"), (dict(block_k="16"), "block_k"),
                    (dict(block_k_bwd=True), "block_k_bwd"), (dict(block_q=None), "block_q"),
                    (dict(num_stages=0), "num_stages"), (dict(num_warps=2.5), "num_warps")):
    with pytest.raises(ValueError, match=f"block_sizes.{field} must be"):
      BlockSizes(**kw)


def test_pruning_accepts_scalar_numbers_and_rejects_non_finite():
  for tol in (np.float32(-10.0), np.float64(-10.0), jnp.float32(-10.0), np.int64(-10)):
    p = Pruning(log_tolerance=tol, qk_bound=np.float32(2.5))
    assert type(p.log_tolerance) is float and p.log_tolerance == -10.0 and p.qk_bound == 2.5
  for tol in (float("nan"), float("-inf"), np.float32("nan"), "-10", True, jnp.zeros(2)):
    with pytest.raises(ValueError, match="pruning.log_tolerance"):
      Pruning(log_tolerance=tol)
  for bound in (float("nan"), float("inf"), -1.0, np.float32("inf")):
    with pytest.raises(ValueError, match="pruning.qk_bound"):
      Pruning(qk_bound=bound)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), np.float32("-inf"), "0.5"])
def test_sm_scale_must_be_finite(scale):
  with pytest.raises(ValueError, match="sm_scale"):
    forgetting_attention(*_args(), sm_scale=scale, impl="reference")


def test_sm_scale_accepts_scalar_numbers():
  args = _args()
  expected = forgetting_attention(*args, sm_scale=0.5, impl="reference")
  for scale in (np.float32(0.5), jnp.float32(0.5)):
    np.testing.assert_array_equal(forgetting_attention(*args, sm_scale=scale, impl="reference"),
                                  expected)


def test_array_likes_are_accepted():
  """Python lists (and numpy arrays) work like the jax arrays they convert to."""
  inp = make_inputs(1, 8, 8, 2, 1, 16, jnp.float32, segments=2, seed=4)
  as_list = lambda x: np.asarray(x).tolist()
  for impl in ("reference", "xla"):
    expected = forgetting_attention(inp.q, inp.k, inp.v, inp.log_fgate,
                                    segment_ids=inp.segment_ids, impl=impl)
    got = forgetting_attention(*map(as_list, (inp.q, inp.k, inp.v, inp.log_fgate)),
                               segment_ids=as_list(inp.segment_ids), impl=impl)
    np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="q must be an array"):
    forgetting_attention("q", inp.k, inp.v, inp.log_fgate)
  with pytest.raises(ValueError, match="segment_ids must be an array"):
    forgetting_attention(inp.q, inp.k, inp.v, inp.log_fgate, segment_ids=[[0, 1], [2]])


# Ids that int32 cannot tell apart (they differ only above 2**32), in runs that come back:
# equal ids that are not adjacent, and ids that are not sorted.
_WIDE_IDS = (np.arange(40) // 7 % 3 == 1) * 2 ** 32 + (np.arange(40) // 7 % 3 == 2) * 2 ** 33 + 5


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_int64_segment_ids_keep_their_equalities(impl):
  inp = make_inputs(2, 40, 40, 2, 1, 16, jnp.float32, seed=8)
  with jax.enable_x64(True):
    seg = jnp.asarray(np.stack([_WIDE_IDS, _WIDE_IDS[::-1]]), jnp.int64)
    inp = inp._replace(segment_ids=seg)

    def loss(q, k, v, lf):
      o = forgetting_attention(q, k, v, lf, segment_ids=seg, impl=impl,
                               block_sizes=BlockSizes(16, 16), interpret=interpret_for(impl))
      return jnp.sum(o * inp.do), o

    (dq, dk, dv, dlf), o = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        inp.q, inp.k, inp.v, inp.log_fgate)
    ref = reference_f64(inp)
  for name, x in (("o", o), ("dq", dq), ("dk", dk), ("dv", dv), ("dlog_fgate", dlf)):
    assert_close(x, ref[name], jnp.float32, name)


def test_host_64bit_segment_ids_keep_their_equalities():
  """numpy int64 / uint64 ids and Python ints beyond int32 and int64, with jax_enable_x64
  off: ranked on the host. jnp.asarray cast them to int32 (merging ids that differ only
  above bit 32: finite, wrong outputs) or raised OverflowError."""
  assert not jax.config.jax_enable_x64
  inp = make_inputs(2, 40, 40, 2, 1, 16, jnp.float32, seed=8)
  ids = np.stack([_WIDE_IDS, _WIDE_IDS[::-1]])
  ranks = np.unique(ids, return_inverse=True)[1].reshape(ids.shape)
  expected = reference_f64(inp._replace(segment_ids=jnp.asarray(ranks, jnp.int32)), grads=False)
  huge = [[int(i) * 2 ** 40 - 2 ** 70 for i in row] for row in ids.tolist()]  # beyond int64
  for name, seg in (("int64", ids), ("uint64", ids.astype(np.uint64)), ("list", ids.tolist()),
                    ("huge list", huge)):
    for impl in ("reference", "xla"):
      o = forgetting_attention(inp.q, inp.k, inp.v, inp.log_fgate, segment_ids=seg, impl=impl,
                               block_sizes=BlockSizes(16, 16) if impl == "xla" else None)
      assert_close(o, expected["o"], jnp.float32, f"{impl} {name}")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_constant_log_fgate_under_jit(impl):
  """A log_fgate closed over by a jit is concrete: its positivity check runs (eagerly) instead
  of raising TracerBoolConversionError, for JAX and numpy constants alike."""
  q, k, v, lf = _args()
  expected = forgetting_attention(q, k, v, lf, impl=impl)
  for const in (lf, np.asarray(lf)):
    f = jax.jit(lambda q, k, v: forgetting_attention(q, k, v, const, impl=impl))
    np.testing.assert_array_equal(np.asarray(f(q, k, v)), np.asarray(expected))
  for const in (-lf, -np.asarray(lf)):
    with pytest.raises(ValueError, match="log_fgate must be <= 0"):
      jax.jit(lambda q, k, v: forgetting_attention(q, k, v, const, impl=impl))(q, k, v)


def test_qknorm_bound_validates_its_weights():
  """Array-likes of real numbers with shape [D] or [H, D] at construction, heads and head dim
  at use; anything else is a ValueError naming the field (lists gave AttributeError, the
  wrong heads a TypeError from a multiply, strings were accepted)."""
  q, k, _, _ = _args()  # Hq=4, Hkv=2, D=16
  as_list = QKNormBound([1.5] * 16, [[0.5] * 16, [2.0] * 16])
  as_arrays = QKNormBound(jnp.full((16,), 1.5), jnp.asarray([[0.5] * 16, [2.0] * 16]))
  np.testing.assert_array_equal(
      np.asarray(pruning.qk_bound(q, k, Pruning(qk_bound=as_list), 0.25)),
      np.asarray(pruning.qk_bound(q, k, Pruning(qk_bound=as_arrays), 0.25)))
  for bad, field in ((("a", "b"), "q_scale"), ((np.ones(16), "b"), "k_scale"),
                     (([[1.0], [2.0, 3.0]], np.ones(16)), "q_scale"),
                     ((np.ones((2, 2, 16)), np.ones(16)), "q_scale"),
                     ((np.ones(16), np.ones((2, 0))), "k_scale"),
                     ((np.ones(16, bool), np.ones(16)), "q_scale"),
                     ((np.ones(16), jnp.ones(16, jnp.complex64)), "k_scale")):
    with pytest.raises(ValueError, match=f"QKNormBound.{field} must be a float array"):
      QKNormBound(*bad)
  for bound, field in ((QKNormBound(np.ones((3, 16)), np.ones(16)), "q_scale"),
                       (QKNormBound(np.ones(16), np.ones((4, 16))), "k_scale"),
                       (QKNormBound(np.ones(8), np.ones(16)), "q_scale")):
    with pytest.raises(ValueError, match=f"pruning.qk_bound.{field} must have shape"):
      forgetting_attention(q, k, k, -jnp.ones((1, 8, 4)), pruning=Pruning(qk_bound=bound),
                           impl="xla")


def test_jax_scalars_and_flags():
  """BlockSizes takes JAX scalars like numpy ones; interpret and return_stats must be bools
  ("no" was taken as true); sm_scale must be finite in float32."""
  assert BlockSizes(jnp.float32(16), jnp.int32(32), num_warps=jnp.float32(4)) == BlockSizes(
      16, 32, num_warps=4)
  for value in (jnp.float32(16.5), jnp.bool_(True), jnp.zeros(2)):
    with pytest.raises(ValueError, match="block_sizes.block_q must be"):
      BlockSizes(block_q=value)
  args = _args()
  for name in ("interpret", "return_stats"):
    for value in ("no", 1, None):
      with pytest.raises(ValueError, match=f"{name} must be a bool"):
        forgetting_attention(*args, impl="reference", **{name: value})
  o, _ = forgetting_attention(*args, impl="reference", return_stats=np.bool_(True),
                              interpret=np.bool_(False))
  for scale in (1e300, -1e39):
    with pytest.raises(ValueError, match="sm_scale must be finite in float32"):
      forgetting_attention(*args, sm_scale=scale, impl="reference")


# ----------------------------------------------------------------------------- other platforms

_KERNELS = {"cuda": r"__gpu\$xla\.gpu\.triton", "tpu": r"custom_call @tpu_custom_call"}


def _lowered_text(impl, platform, T=256, D=64):
  """StableHLO of the public op's loss and gradients, lowered for ``platform`` from here."""

  def f(q, k, v, lf):
    def loss(q, k, v, lf):
      return jnp.sum(forgetting_attention(q, k, v, lf, impl=impl).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, lf)

  sd = jax.ShapeDtypeStruct
  shapes = (sd((1, T, 4, D), jnp.bfloat16), sd((1, T, 2, D), jnp.bfloat16),
            sd((1, T, 2, D), jnp.bfloat16), sd((1, T, 4), jnp.float32))
  return jax.jit(f).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu", "cpu"])
def test_auto_lowers_for_the_target_platform(platform):
  """impl='auto' picks the kernel of the platform the program is lowered for (ahead-of-time
  lowering from a CPU host), not of the host: forward, dQ and dK/dV kernels on cuda and tpu,
  the blockwise XLA loops elsewhere."""
  text = _lowered_text("auto", platform)
  for p, pattern in _KERNELS.items():
    assert len(re.findall(pattern, text)) == (3 if p == platform else 0), p
  if platform == "cpu":
    assert "stablehlo.while" in text
  else:
    for name in ("forgetting_attention_fwd", "forgetting_attention_dq", "forgetting_attention_dkv"):
      assert name in text


@pytest.mark.parametrize("impl,platform,other", [("pallas_gpu", "cuda", "tpu"),
                                                 ("pallas_tpu", "tpu", "cuda")])
def test_pallas_impl_lowers_only_for_its_platform(impl, platform, other):
  """An explicit Pallas impl lowers through the public op for its own platform; for any
  other one (and under jit on this CPU) it raises the ValueError the eager call raises."""
  assert len(re.findall(_KERNELS[platform], _lowered_text(impl, platform))) == 3
  backend = "GPU" if impl == "pallas_gpu" else "TPU"
  for target in (other, "cpu"):
    with pytest.raises(ValueError, match=f"impl='{impl}' needs a {backend} backend"):
      _lowered_text(impl, target)
  if jax.default_backend() == "cpu":
    q, k, v, lf = _args()
    with pytest.raises(ValueError, match=f"impl='{impl}' needs a {backend} backend"):
      jax.jit(functools.partial(forgetting_attention, impl=impl))(q, k, v, lf)
    with pytest.raises(ValueError, match=f"impl='{impl}' needs a {backend} backend"):
      forgetting_attention(q, k, v, lf, impl=impl)

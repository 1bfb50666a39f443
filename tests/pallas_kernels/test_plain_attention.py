"""plain_attention (no forget gate) against the float64 forgetting reference with log f = 0;
cuda / tpu lowering from the CPU; one-line errors.

Every plain implementation that runs here (xla as is, the Pallas ones in interpret mode)
runs the first case, which covers several edges at once, at the smallest tiles its registry
line allows, so that the sequences span several tiles; xla, the CPU default, also runs the
second (compiling each costs seconds here, whatever the shape). cuDNN cannot be traced on a
host without the CUDA plugin: it is lowered for cuda with JAX's cuDNN version probe patched,
and compared with the reference only on a GPU.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.forgetting_attention import registry
from pallas_kernels.forgetting_attention.common import BlockSizes
from pallas_kernels.forgetting_attention.plain import plain_attention
from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference
from tests.kernel_utils import Inputs, make_inputs
from tests.tolerances import assert_close

ON_GPU = jax.default_backend() == "gpu"


def _packed(B, S):
  """Row 0: two documents and trailing padding (id 0, after id 2: unsorted ids); row 1: a
  document from 0 to 60, across tile boundaries, then another."""
  seg = np.zeros((B, S), np.int32)
  seg[0, :37], seg[0, 37:82] = 1, 2
  seg[1, :60], seg[1, 60:] = 3, 4
  return jnp.asarray(seg)


# (B, T, S, Hq, Hkv, D, dtype, packed segments)
CASES = [
    # S > T (queries are the last T), GQA 4/2, T and S not multiples of any tile, packed
    # documents with padding id 0.
    (2, 70, 100, 4, 2, 32, jnp.float32, True),
    # bfloat16, T = S, one kv head for two q heads, no segments.
    (1, 200, 200, 2, 1, 64, jnp.bfloat16, False),
]
# (impl, case): every implementation but cuDNN (no segments) on the first case, xla and, on a
# GPU, cuDNN on the second.
RUNS = ([(i, CASES[0]) for i in registry.PLAIN_IMPLS if i != "cudnn"]
        + [(i, CASES[1]) for i in ("xla",) + (("cudnn",) if ON_GPU else ())])


def _interpret(impl: str) -> bool:
  """Whether a plain ``impl`` must run in interpret mode here (a Pallas one off its backend)."""
  line = registry.PLAIN[impl]
  return line.interpret and line.backend != jax.default_backend()


@functools.lru_cache(maxsize=None)
def _case(B, T, S, Hq, Hkv, D, dtype, packed) -> tuple[Inputs, dict]:
  """The inputs (log f = 0) and the float64 reference, once per case for every impl."""
  inp = make_inputs(B, T, S, Hq, Hkv, D, dtype, seed=B + T + D)
  inp = inp._replace(log_fgate=jnp.zeros_like(inp.log_fgate),
                     segment_ids=_packed(B, S) if packed else None)
  return inp, _reference_f64(inp)


def _reference_f64(inp: Inputs) -> dict:
  """o and the gradients of sum(o * do) from the forgetting reference in float64 with the
  zero gate (jitted: a fifth of the eager reference's time here)."""
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))

    @jax.jit
    def run(q, k, v, log_f, seg, do):
      f = lambda q, k, v: forgetting_attention_reference(q, k, v, log_f, segment_ids=seg)[0]
      o, vjp = jax.vjp(f, q, k, v)
      return o, *vjp(do)

    out = run(f64(inp.q), f64(inp.k), f64(inp.v), f64(inp.log_fgate), inp.segment_ids,
              f64(inp.do))
    return dict(zip(("o", "dq", "dk", "dv"), map(np.asarray, out)))


@pytest.mark.parametrize("impl,case", RUNS, ids=[
    f"{i}-{'f32-prefill-gqa-packed' if c is CASES[0] else 'bf16-mqa'}" for i, c in RUNS])
def test_matches_forgetting_reference_with_zero_gate(impl, case):
  inp, ref = _case(*case)
  tiles = registry.PLAIN[impl].small_tiles

  @jax.jit
  def run(q, k, v, do):
    f = lambda q, k, v: plain_attention(q, k, v, segment_ids=inp.segment_ids, impl=impl,
                                        block_sizes=tiles, interpret=_interpret(impl))
    o, vjp = jax.vjp(f, q, k, v)
    return o, *vjp(do)

  got = dict(zip(("o", "dq", "dk", "dv"), run(inp.q, inp.k, inp.v, inp.do)))
  for name, x in got.items():
    assert x.dtype == case[6]
    assert_close(x, ref[name], case[6], f"{impl} {name}")


# ----------------------------------------------------------------------------- lowering


def _grad_fn(impl, segments):
  def f(q, k, v, seg):
    loss = lambda q, k, v: jnp.sum(plain_attention(
        q, k, v, segment_ids=seg if segments else None, impl=impl).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return jax.jit(f)


def _shapes(T, D, dtype=jnp.bfloat16, B=1, Hq=4, Hkv=2):
  sd = jax.ShapeDtypeStruct
  return (sd((B, T, Hq, D), dtype), sd((B, T, Hkv, D), dtype), sd((B, T, Hkv, D), dtype),
          sd((B, T), jnp.int32))


@pytest.mark.parametrize("impl,segments", [("pallas_tpu", False), ("auto", True)])
def test_lowers_for_tpu_as_splash(impl, segments):
  text = _grad_fn(impl, segments).trace(*_shapes(4096, 128)).lower(
      lowering_platforms=("tpu",)).as_text()
  names = re.findall(r'kernel_name = "(splash_mha_\w+)"', text)
  assert sorted(n.split("_")[2] for n in names) == ["dkv", "dq", "fwd"], names
  assert all(("_segmented" in n) == segments for n in names), names
  assert len(re.findall(r"custom_call @tpu_custom_call", text)) == 3


def test_lowers_for_cuda_as_pallas_flash():
  """With segments "auto" on cuda is the Pallas flash attention (cuDNN takes none)."""
  text = _grad_fn("auto", True).trace(*_shapes(4096, 64)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"__gpu\$xla\.gpu\.triton", text)) == 3
  for name in ("mha_forward", "mha_preprocess_backward", "mha_backward"):
    assert name in text
  assert "cudnn" not in text


def test_pallas_gpu_float32_dots_are_not_tf32():
  """Triton turns float32 dots of default precision into TF32: every dot of the upstream
  kernels, forward and backward, is traced at HIGHEST for float32 inputs."""
  q, k, v, seg = _shapes(256, 64, jnp.float32)
  text = str(_grad_fn("pallas_gpu", True).trace(q, k, v, seg).jaxpr)
  dots = text.count("dot_general[")
  assert dots >= 9, dots  # forward 2, dK/dV and dQ backward
  assert text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == dots


@pytest.fixture
def cudnn_probe_patched(monkeypatch):
  """JAX refuses to trace cuDNN attention where its jaxlib has no CUDA plugin ("cuDNN is not
  detected"), even for a cuda lowering; pretend cuDNN 9.8 is there. Traces made under the
  pretence are dropped afterwards."""
  if ON_GPU:
    yield
    return
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90800)
  yield
  jax.clear_caches()


@pytest.mark.parametrize("impl", ["cudnn", "auto"])
def test_cudnn_lowers_for_cuda(impl, cudnn_probe_patched):
  """cudnn (and "auto" on cuda for bf16 without segments): cuDNN's fused causal forward and
  backward, no Triton kernel; queries padded in front when S > T."""
  q, k, v, seg = _shapes(384, 64)
  k = v = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)  # S > T
  text = _grad_fn(impl, False).trace(q, k, v, seg).lower(lowering_platforms=("cuda",)).as_text()
  calls = re.findall(r"custom_call @(__cudnn\$\w+)", text)
  assert sorted(calls) == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"], calls
  assert text.count(r"\22mask_type\22: \22CAUSAL\22") == 2
  assert "triton" not in text


# ----------------------------------------------------------------------------- errors


def _arrays(dtype=jnp.bfloat16, D=32, T=8):
  x = jnp.ones((1, T, 2, D), dtype)
  return x, x, x


ERRORS = [
    (dict(impl="flash"), "impl must be one of"),
    (dict(impl="cudnn", segment_ids=jnp.zeros((1, 8), jnp.int32)), r"^segment_ids: impl='cudnn'"),
    (dict(impl="cudnn", dtype=jnp.float32), r"^q dtype: impl='cudnn'"),
    (dict(impl="cudnn", D=36), r"^q head dim: impl='cudnn'"),
    (dict(impl="cudnn", interpret=True), r"^interpret: impl='cudnn'"),
    (dict(impl="pallas_tpu", block_sizes=BlockSizes(128, 64)),
     r"^block_sizes\.block_k: impl='pallas_tpu'"),
    (dict(impl="auto", block_sizes=BlockSizes(64, 64)),
     r"^block_sizes\.block_q: impl='pallas_tpu'"),
    (dict(impl="pallas_gpu", block_sizes=BlockSizes(16, 16, 32, 16)),
     r"^block_sizes: impl='pallas_gpu'"),
    (dict(impl="xla", sm_scale="big"), "^sm_scale must be a finite number"),
    (dict(impl="xla", interpret="yes"), "^interpret must be a bool"),
    (dict(impl="xla", segment_ids=jnp.zeros((1, 9), jnp.int32)), r"^segment_ids must have shape"),
]


@pytest.mark.parametrize("kwargs,match", ERRORS,
                         ids=[f"{kw['impl']}-{i}" for i, (kw, _) in enumerate(ERRORS)])
def test_bad_input_is_a_one_line_value_error(kwargs, match):
  kwargs = dict(kwargs)
  q, k, v = _arrays(kwargs.pop("dtype", jnp.bfloat16), kwargs.pop("D", 32))
  with pytest.raises(ValueError, match=match) as e:
    plain_attention(q, k, v, **kwargs)
  assert "\n" not in str(e.value)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the refusal off a TPU")
def test_refuses_other_backend_eagerly_and_at_lowering():
  q, k, v = _arrays()
  with pytest.raises(ValueError, match="impl='pallas_tpu' needs a TPU backend"):
    plain_attention(q, k, v, impl="pallas_tpu")
  f = jax.jit(lambda q, k, v: plain_attention(q, k, v, impl="pallas_tpu"))
  with pytest.raises(ValueError, match="impl='pallas_tpu' needs a TPU backend .*lowered for 'cpu'"):
    f.trace(q, k, v).lower(lowering_platforms=("cpu",))


@pytest.mark.skipif(ON_GPU, reason="checks the refusal where cuDNN cannot be traced")
def test_cudnn_without_cuda_plugin_is_a_value_error():
  q, k, v = _arrays()
  with pytest.raises(ValueError, match="impl='cudnn' needs a GPU backend"):
    plain_attention(q, k, v, impl="cudnn")
  f = jax.jit(lambda q, k, v: plain_attention(q, k, v, impl="cudnn"))
  with pytest.raises(ValueError, match="JAX cannot trace cuDNN attention on this host"):
    f.trace(q, k, v)

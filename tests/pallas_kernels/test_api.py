"""Bad input gets a ValueError that names the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import BlockSizes, Pruning, forgetting_attention
from pallas_kernels.forgetting_attention import pruning
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


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu", "pallas_tpu"])
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

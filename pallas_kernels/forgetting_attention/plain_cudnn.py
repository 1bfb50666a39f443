"""Plain causal attention through cuDNN's fused flash attention: the ``cudnn`` line of
``registry.PLAIN``.

``jax.nn.dot_product_attention(q, k, v, scale=, is_causal=True, implementation="cudnn")``
(forward and backward are cuDNN kernels). What it cannot take, in this JAX (0.10):

- segment ids: the public function has no segment or packed-document argument (only
  per-batch query / key lengths); a boolean ``mask`` becomes a dense [B, H, T, S] bias (the
  O(T^2) memory this op avoids), and the packed layout of
  ``jax._src.cudnn.fused_attention_stablehlo`` needs a static bound on the documents per row
  and a [B * bound, H, T] softmax statistic. So ``check`` refuses ``segment_ids``, and
  ``"auto"`` (``plain``) runs ``pallas_gpu`` (the upstream Pallas flash attention, which
  masks segments) whenever there are segments;
- float32 (cuDNN's flash attention is bfloat16 / float16 only), head dims that are not a
  multiple of 8 or above 128 (256 needs a Hopper GPU, which only the device can tell).

S > T (the queries are the last T of S): cuDNN's causal mask is aligned at the top left, so
q is padded in front with S - T zero rows and the first S - T outputs are dropped (S^2
instead of T S work; the Transformer models always call it with S = T).

Testing: JAX traces this only where cuDNN is present (``check_cudnn_version`` raises
"cuDNN is not detected" on a host whose jaxlib has no CUDA plugin, even when lowering for
cuda), so on a CPU host neither running nor lowering it is possible as is.
``tests/pallas_kernels/test_plain_attention.py`` lowers it for cuda from the CPU with that
version probe patched (the emitted custom calls, the causal mask type), and compares it with
the reference only on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.forgetting_attention.common import BlockSizes

MAX_HEAD_DIM = 128
DTYPES = (jnp.bfloat16, jnp.float16)


def available() -> bool:
  """Whether JAX can trace cuDNN attention on this host (its jaxlib has the CUDA plugin)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    fa.check_cudnn_version()
  except (ImportError, RuntimeError):
    return False
  return True


def unsupported(q, segment_ids, interpret: bool):
  """Why cuDNN cannot run these inputs (a message naming the argument), or None."""
  D = q.shape[-1]
  if segment_ids is not None:
    return ("segment_ids: impl='cudnn' takes no segment ids (cuDNN in this JAX has no "
            "segment mask); use impl='pallas_gpu' or 'auto'")
  if q.dtype not in DTYPES:
    return f"q dtype: impl='cudnn' needs bfloat16 or float16 inputs, got {q.dtype}"
  if D % 8 or D > MAX_HEAD_DIM:
    return f"q head dim: impl='cudnn' needs a multiple of 8 up to {MAX_HEAD_DIM}, got {D}"
  if interpret:
    return "interpret: impl='cudnn' has no interpret mode (it is a cuDNN kernel)"
  return None


def check(q, k, segment_ids, block_sizes, interpret: bool) -> None:
  del k, block_sizes
  why = unsupported(q, segment_ids, interpret)
  if why is not None:
    raise ValueError(why)


def attention(q, k, v, segment_ids, *, sm_scale: float, block_sizes: BlockSizes,
              interpret: bool = False):
  """o [B, T, Hq, D] (q.dtype) from cuDNN's causal flash attention; GQA is native."""
  del block_sizes, interpret
  assert segment_ids is None  # refused by ``check``
  if not available():
    raise ValueError("impl='cudnn': JAX cannot trace cuDNN attention on this host (its jaxlib "
                     "has no CUDA plugin: 'cuDNN is not detected'); use impl='auto' or "
                     "'pallas_gpu'")
  T, S = q.shape[1], k.shape[1]
  if S > T:
    q = jnp.pad(q, ((0, 0), (S - T, 0), (0, 0), (0, 0)))
  o = jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=True,
                                   implementation="cudnn")
  return o[:, S - T:]

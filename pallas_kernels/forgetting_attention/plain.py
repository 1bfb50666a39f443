"""``plain_attention``: causal softmax attention without a forget gate, each backend's best.

The same function as ``forgetting_attention(q, k, v, zeros)`` (log f = 0, so D_ij = 0), on
the same layout: q [B, T, Hq, D] the last T of the S positions of k, v [B, S, Hkv, D] (GQA),
``segment_ids`` [B, S] with attention only between equal ids. Segment ids are compared for
equality only, exactly as in the forgetting op: the data pipeline's padding id 0 is an
ordinary segment (padding tokens attend causally to earlier padding, never to documents,
and every query sees at least its own key). It is what the Transformer baselines run
(``fox_jax`` models with ``forget_gate="none"``), so that a FoX-against-Transformer speed
comparison does not charge the Transformer for a decay it does not have.

Implementations (``registry.PLAIN``), chosen like the forgetting op's where the program is
lowered (``api._on_platform``):

  impl         what                                                         where it is tested
  xla          ``xla``'s blockwise kernels with no gate (flash forward,     CPU, against the
               one-pass flash backward), O(T block) memory; every backend   float64 reference
  cudnn        ``jax.nn.dot_product_attention(is_causal=True,               cuda lowering from a
               implementation="cudnn")``; no segment ids, bf16 / f16,       CPU with the cuDNN
               D % 8 == 0, D <= 128 (``plain_cudnn``)                       probe patched; GPU
  pallas_gpu   JAX's Pallas flash attention for GPUs (Triton, causal,       interpret mode;
               segment mask; ``plain_gpu``)                                 cuda lowering
  pallas_tpu   JAX's splash attention (Mosaic TPU, causal mask, segment     TPU interpret mode;
               ids; ``plain_tpu``)                                          tpu lowering
  auto         cuda: cudnn when it can take the inputs (no segment ids, bf16 / f16, its head
               dims) and JAX can trace cuDNN on this host, else pallas_gpu; rocm: pallas_gpu;
               tpu: pallas_tpu; elsewhere xla

"auto" decides cudnn against pallas_gpu when the program is traced (from the inputs' dtype,
head dim and segment ids, and whether this host's jaxlib has cuDNN), the platform when it is
lowered: a CPU host without the CUDA plugin that compiles for a GPU ahead of time gets
pallas_gpu. An explicit implementation that cannot take the inputs is a one-line ValueError
naming the argument; one bound to another backend fails like the forgetting op's Pallas
impls (at once when called on arrays, at lowering under jit).

The model (``fox_jax.attention``) calls this for ``forget_gate="none"`` with
``ModelConfig.plain_attn_impl``; context parallelism and cached decoding keep the
forgetting op with a zero gate.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.forgetting_attention import api, registry
from pallas_kernels.forgetting_attention.common import BlockSizes

PLAIN_IMPLS = registry.PLAIN_IMPLS
_BOUND = {n: i for n, i in registry.PLAIN.items() if i.backend is not None}
# "auto" on cuda is decided per call (``_cuda_impl``), the rest here.
_TABLE = api.Platforms({n: i.platforms for n, i in _BOUND.items()},
                       {n: i.backend for n, i in _BOUND.items()},
                       tuple(n for n, i in _BOUND.items() if i.interpret),
                       dict(cuda="pallas_gpu", rocm="pallas_gpu", tpu="pallas_tpu"), "xla")


class _Config(NamedTuple):
  impl: str  # "auto" or a plain implementation
  sm_scale: float
  block_sizes: Optional[BlockSizes]  # None: each implementation's default tiles
  interpret: bool
  cuda: str  # what "auto" runs on cuda for these inputs (``_cuda_impl``)


def plain_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: Optional[jax.Array] = None,
    sm_scale: Optional[float] = None,
    impl: str = "auto",
    block_sizes: Optional[BlockSizes] = None,
    interpret: bool = False,
) -> jax.Array:
  """Causal softmax attention (no gate): ``forgetting_attention`` with log f = 0.

  Args:
    q: [B, T, Hq, D] queries: the last T of the S positions.
    k, v: [B, S, Hkv, D], Hq a multiple of Hkv (GQA). One dtype: float32, bfloat16 or
      float16; accumulation is float32.
    segment_ids: [B, S] integer ids of packed documents; attention only between equal ids
      (64-bit host ids are ranked as in the forgetting op).
    sm_scale: logit scale, a number finite in float32 (default D ** -0.5).
    impl: "xla" | "cudnn" | "pallas_gpu" | "pallas_tpu" | "auto" (see the module docstring).
    block_sizes: tiles (:class:`BlockSizes`) for the implementation that runs (None: its
      default); with "auto" they must suit every implementation it may pick.
    interpret: run a Pallas implementation in interpret mode (for CPU tests); a bool.

  Array arguments may be any array-like; every dimension must be >= 1.

  Returns:
    o: [B, T, Hq, D] in q.dtype.
  """
  q, k, v = (api._as_array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
  if segment_ids is not None:
    segment_ids = api._as_array(api._host_segment_ids(segment_ids), "segment_ids")
  if impl not in PLAIN_IMPLS + ("auto",):
    raise ValueError(f"impl must be one of {PLAIN_IMPLS + ('auto',)}, got {impl!r}")
  api._validate_qkv(q, k, v, allow_float64=False)
  api._validate_segment_ids(segment_ids, q.shape[0], k.shape[1])
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes)}")
  scale = api._scale(sm_scale, q.shape[-1])
  interpret = api._check_flag(interpret, "interpret")
  # "auto" may run xla, pallas_gpu or pallas_tpu (cudnn only where it takes the inputs).
  for name in _candidates(impl):
    check = getattr(registry.module(name, registry.PLAIN), "check", None)
    if check is not None:
      check(q, k, segment_ids, block_sizes, interpret)
  api._check_eager_backend(impl, interpret, (q, k, v), _TABLE)
  cuda = _cuda_impl(q, segment_ids, interpret) if impl == "auto" else "pallas_gpu"
  return _plain(q, k, v, segment_ids, _Config(impl, scale, block_sizes, interpret, cuda))


def _candidates(impl: str) -> tuple[str, ...]:
  return (_TABLE.fallback, *sorted(set(_TABLE.auto.values()))) if impl == "auto" else (impl,)


def _cuda_impl(q, segment_ids, interpret: bool) -> str:
  """"auto" on cuda: cudnn where it takes these inputs and this host can trace it (decided
  before the jit, so that its cache is keyed on the choice)."""
  cudnn = registry.module("cudnn", registry.PLAIN)
  if cudnn.unsupported(q, segment_ids, interpret) is None and cudnn.available():
    return "cudnn"
  return "pallas_gpu"


@functools.partial(jax.jit, static_argnames=("cfg",))
def _plain(q, k, v, segment_ids, cfg):
  """One compiled program per configuration (inside a user's jit this inlines)."""
  if segment_ids is not None:
    segment_ids = api._int32_segment_ids(segment_ids)
  table = _TABLE._replace(auto={**_TABLE.auto, "cuda": cfg.cuda})

  def make(impl):
    attention = registry.module(impl, registry.PLAIN).attention
    bs = cfg.block_sizes or registry.default_block_sizes(impl, q.shape[-1], registry.PLAIN)
    interpret = cfg.interpret and registry.PLAIN[impl].interpret
    return lambda q, k, v, seg: (attention(q, k, v, seg, sm_scale=cfg.sm_scale, block_sizes=bs,
                                           interpret=interpret),)

  shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),)
  return api._on_platform(cfg, make, shapes, q, k, v, segment_ids, table=table)[0]

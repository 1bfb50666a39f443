"""``forgetting_attention``: validation, dispatch and the custom_vjp glue shared by all kernels.

Every blockwise implementation (module ``xla``, ``gpu``, ``tpu``) exposes the same functions
on the cumulative gate ``c`` (a double-float pair, see ``common``):

  forward(q, k, v, c_hi, c_lo, segment_ids, delta, *, sm_scale, block_sizes, interpret)
      -> o [B, T, Hq, D] (q.dtype), lse [B, Hq, T] f32, kept_tiles [B, Hq] i32,
         lse_res [B, Hq, T] f32
  backward(q, k, v, c_hi, c_lo, segment_ids, delta, o, lse_res, do, dlse, *, sm_scale,
           block_sizes, interpret) -> dq, dk, dv, dc [B, S, Hq] f32

``lse`` is the natural log-sum-exp (the stats); ``lse_res`` is the log-sum-exp in the units
the module's backward recomputes P in, exactly as its forward computed it (natural for xla
and pallas_tpu, where it is ``lse``; base 2 for pallas_gpu): a backward that converts the
units rounds it, and P = exp(s - lse) inherits that error times |lse|.
  default_block_sizes(head_dim) -> BlockSizes (optional: tiles tuned for that backend)

Which implementation runs is decided when the program is lowered, for the platform it is
lowered for (``_on_platform``), so a CPU host can compile the op ahead of time for a TPU or a
GPU through the public function.

``delta`` [B, Hq] (or None) is the ACP threshold: pairs with D_ij < delta are dropped
element-wise, and tiles holding only such pairs are skipped, so every implementation computes
the reference's pruned function whatever its tiles. dc_t = sum_{j != t} dS_tj -
sum_{i != t} dS_it is the gradient of the loss with respect to c_t; the diagonal, which the
row and the column sum share, is left out because it cancels badly under strong forgetting
(P_tt ~ 1). For the same reason dS is not formed from di = rowsum(o * do) - dlse of the
rounded output: each backward anchors dS at the query's own key (``common``, "anchored dS");
``o`` only feeds an estimate whose error that anchoring suppresses.
Here, dlog_f is the reverse cumsum of dc. Before the cumulative sum, log f is floored per
batch x head (``common``, "zero gates") so that f = 0 forgets exactly instead of giving NaN.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from pallas_kernels.forgetting_attention import common
from pallas_kernels.forgetting_attention import pruning as pruning_lib
from pallas_kernels.forgetting_attention import registry
from pallas_kernels.forgetting_attention.common import AttentionStats, BlockSizes
from pallas_kernels.forgetting_attention.pruning import Pruning
from pallas_kernels.forgetting_attention.reference import forgetting_attention_reference

IMPLS = registry.IMPLS
# The backend each Pallas implementation compiles for (elsewhere it needs interpret=True),
# and the lowering platforms of that backend.
_BACKENDS = {n: registry.REGISTRY[n].backend for n in registry.PALLAS}
_PLATFORMS = {n: registry.REGISTRY[n].platforms for n in registry.PALLAS}
_FLOAT_INPUTS = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256


class Platforms(NamedTuple):
  """Where the implementations of an op lower (``_on_platform``): one per registry table."""

  platforms: dict  # implementation bound to a backend -> the lowering platforms of that backend
  backends: dict  # that implementation -> its backend ("gpu", "tpu"), for the errors
  interpret: tuple  # the bound implementations with an interpret mode (Pallas)
  auto: dict  # lowering platform -> the implementation "auto" runs there
  fallback: str  # the implementation "auto" runs on every other platform


# The forgetting op's: "auto" is pallas_gpu on cuda / rocm, pallas_tpu on tpu, xla elsewhere.
_TABLE = Platforms(_PLATFORMS, _BACKENDS, registry.PALLAS,
                   dict(cuda="pallas_gpu", rocm="pallas_gpu", tpu="pallas_tpu"), "xla")


class _Config(NamedTuple):
  impl: str  # "auto" or a blockwise implementation
  sm_scale: float
  block_sizes: Optional[BlockSizes]  # None: each implementation's tuned tiles
  interpret: bool


def _as_array(x, name: str):
  """Arrays (jax, numpy) as they are; other array-likes (nested lists) through jnp.asarray."""
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return x
  if isinstance(x, (str, bytes)):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an array, got {type(x).__name__}") from None


def _host_segment_ids(x):
  """Host ids (numpy arrays, nested lists) of more than 32 bits as int32 ranks; else ``x``.

  ``jnp.asarray`` casts 64-bit integers to int32 unless jax_enable_x64 is on, which merges
  ids that differ only above bit 32 (and Python ints beyond int32 raise OverflowError), so
  such ids are ranked here, on the host, before they become a JAX array: ``np.unique``'s
  inverse is equal exactly where the ids are equal and keeps their order (sorted ids stay
  sorted for the tile ranges). Python ints beyond int64, which numpy turns into floats or
  objects, are ranked as Python ints. JAX arrays are left to ``_int32_segment_ids``.
  """
  if isinstance(x, (jax.Array, str, bytes)):
    return x
  try:
    arr = np.asarray(x)
    if arr.dtype.kind in "fO":  # maybe Python ints too large for int64
      obj = np.asarray(x, dtype=object)
      if obj.size and all(isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_))
                          for i in obj.flat):
        arr = obj
  except (TypeError, ValueError, OverflowError):
    return x  # not an array: _as_array names the argument
  if arr.dtype == object or (arr.dtype.kind in "iu" and arr.dtype.itemsize > 4):
    _, rank = np.unique(arr, return_inverse=True)
    return rank.reshape(arr.shape).astype(np.int32)
  return x


def _any_positive(x) -> bool:
  """Whether a concrete ``x`` has an element > 0 (False for a traced one, which can't tell).

  numpy input is checked with numpy. A JAX array is concrete but may be a constant closed
  over by a jit: jnp on it inside that trace would give a tracer (and ``bool`` a
  TracerBoolConversionError), so it is evaluated eagerly, on its device.
  """
  if isinstance(x, jax.core.Tracer):
    return False
  if not isinstance(x, jax.Array):
    return bool(np.any(np.asarray(x) > 0))
  with jax.ensure_compile_time_eval():
    return bool(jnp.any(x > 0))


def _scale(sm_scale, head_dim: int) -> float:
  if sm_scale is None:
    return head_dim ** -0.5
  scale = common.finite_number(sm_scale, "sm_scale")
  # The kernels scale float32 logits: a larger scale would be inf there.
  if abs(scale) > float(np.finfo(np.float32).max):
    raise ValueError(f"sm_scale must be finite in float32, got {sm_scale!r}")
  return scale


def _check_flag(value, name: str) -> bool:
  """A Python or numpy bool; strings like "no" and numbers are refused, not taken as truthy."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a bool, got {value!r}")
  return bool(value)


def _validate(q, k, v, log_fgate, segment_ids, impl, block_sizes, pruning):
  if impl not in IMPLS + ("auto",):
    raise ValueError(f"impl must be one of {IMPLS + ('auto',)}, got {impl!r}")
  _validate_qkv(q, k, v, allow_float64=impl == "reference")
  B, S, Hq = q.shape[0], k.shape[1], q.shape[2]
  if log_fgate.shape != (B, S, Hq):
    raise ValueError(f"log_fgate must have shape [B, S, Hq] = {(B, S, Hq)}, got {log_fgate.shape}")
  fg_allowed = (jnp.float32,) + ((jnp.float64,) if impl == "reference" else ())
  if log_fgate.dtype not in fg_allowed:
    raise ValueError(f"log_fgate must be float32, got {log_fgate.dtype}")
  if _any_positive(log_fgate):
    raise ValueError("log_fgate must be <= 0 everywhere (it is log of a forget gate in [0, 1])")
  _validate_segment_ids(segment_ids, B, S)
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a BlockSizes or None, got {type(block_sizes)}")
  if pruning is not None and not isinstance(pruning, Pruning):
    raise ValueError(f"pruning must be a Pruning or None, got {type(pruning)}")


def _validate_qkv(q, k, v, allow_float64: bool) -> None:
  """Shapes and dtypes of q [B, T, Hq, D] and k, v [B, S, Hkv, D] (S >= T, GQA), shared by
  the forgetting op and the plain one (``plain``)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have shape [B, T, H, D], got {x.shape}")
  B, T, Hq, D = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
  Bk, S, Hkv, Dk = k.shape
  if B < 1:
    raise ValueError(f"q batch must be >= 1, got shape {q.shape}")
  if Bk != B:
    raise ValueError(f"k has batch {Bk} but q has batch {B}")
  if Dk != D:
    raise ValueError(f"k has head dim {Dk} but q has head dim {D}")
  if D < 1:
    raise ValueError(f"q head dim must be >= 1, got shape {q.shape}")
  if D > MAX_HEAD_DIM:
    raise ValueError(f"q head dim must be <= {MAX_HEAD_DIM}, got {D}")
  if Hkv < 1:
    raise ValueError(f"k must have at least one head, got shape {k.shape}")
  if Hq < 1:
    raise ValueError(f"q must have at least one head, got shape {q.shape}")
  if Hq % Hkv != 0:
    raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
  if S < T:
    raise ValueError(f"k length S={S} must be >= q length T={T} (queries are the last T)")
  if T < 1:
    raise ValueError("q length must be >= 1")
  allowed = _FLOAT_INPUTS + ((jnp.float64,) if allow_float64 else ())
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in allowed:
      raise ValueError(f"{name} dtype must be one of {[np.dtype(d).name for d in allowed]}, got {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _validate_segment_ids(segment_ids, B: int, S: int) -> None:
  if segment_ids is not None:
    if segment_ids.shape != (B, S):
      raise ValueError(f"segment_ids must have shape [B, S] = {(B, S)}, got {segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids must be an integer array, got {segment_ids.dtype}")


def forgetting_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_fgate: jax.Array,
    *,
    segment_ids: Optional[jax.Array] = None,
    sm_scale: Optional[float] = None,
    pruning: Optional[Pruning] = None,
    impl: str = "auto",
    block_sizes: Optional[BlockSizes] = None,
    interpret: bool = False,
    return_stats: bool = False,
) -> Union[jax.Array, tuple[jax.Array, AttentionStats]]:
  """Causal softmax attention with the forget-gate decay bias D_ij = sum_{l=j+1..i} log f_l.

  Args:
    q: [B, T, Hq, D] queries: the last T of the S positions.
    k, v: [B, S, Hkv, D], Hq a multiple of Hkv (GQA). One dtype for q, k, v: float32,
      bfloat16 or float16 (float64 for ``impl="reference"``); accumulation is float32.
    log_fgate: [B, S, Hq] float32 log forget gates (<= 0) at every key position.
      log f_t = -inf (f_t = 0) forgets everything before t exactly: pairs (i, j) with a
      zero gate in (j, i] get weight 0 and the gate gets gradient 0; finite gates so
      negative that those weights underflow anyway (e.g. -3e38) act the same. A NaN gate
      at t makes the output and lse NaN at every query position >= t of its head.
    segment_ids: [B, S] integer ids of packed documents; no attention across them. Only
      equality matters, and 64-bit ids are compared exactly: numpy arrays and lists (any
      Python ints) are ranked into int32 on the host, 64-bit JAX arrays (jax_enable_x64)
      on the device. (A JAX array made from int64 ids with x64 off was already cast to
      int32 by JAX, which merges ids that differ only above bit 32.)
    sm_scale: logit scale, a number finite in float32 (default D ** -0.5). The decay is not
      scaled.
    pruning: a :class:`Pruning` to skip tiles whose weights are provably negligible.
    impl: "reference" | "xla" | "pallas_gpu" | "pallas_tpu" | "auto" (pallas_gpu on GPU,
      pallas_tpu on TPU, else xla). The platform is the one the program is lowered for, so
      ``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`` on a CPU host gets the
      TPU kernels. A Pallas impl that cannot run raises a ValueError: at once when called on
      arrays of another backend, at lowering under jit; nothing falls back silently.
    block_sizes: tile sizes (:class:`BlockSizes`) for the blockwise implementations.
    interpret: run Pallas kernels in interpret mode (for CPU tests); a bool.
    return_stats: also return :class:`AttentionStats` (log-sum-exp, kept / total tiles); a
      bool.

  Array arguments may be any array-like (numpy arrays, nested lists: converted with
  ``jnp.asarray``); every dimension must be >= 1.

  Returns:
    o: [B, T, Hq, D] in q.dtype, and the stats if ``return_stats``.
  """
  q, k, v, log_fgate = (_as_array(x, name) for x, name in
                        ((q, "q"), (k, "k"), (v, "v"), (log_fgate, "log_fgate")))
  if segment_ids is not None:
    segment_ids = _as_array(_host_segment_ids(segment_ids), "segment_ids")
  _validate(q, k, v, log_fgate, segment_ids, impl, block_sizes, pruning)
  _scale(sm_scale, q.shape[-1])
  interpret = _check_flag(interpret, "interpret")
  return_stats = _check_flag(return_stats, "return_stats")
  _check_eager_backend(impl, interpret, (q, k, v, log_fgate))
  return _forgetting_attention(q, k, v, log_fgate, segment_ids=segment_ids, sm_scale=sm_scale,
                               pruning=pruning, impl=impl, block_sizes=block_sizes,
                               interpret=interpret, return_stats=return_stats)


def _forgetting_attention(q, k, v, log_fgate, *, segment_ids, sm_scale, pruning, impl,
                          block_sizes, interpret, return_stats):
  """Dispatch without the eager backend check (the lowering still checks the platform)."""
  scale = _scale(sm_scale, q.shape[-1])
  delta = None if pruning is None else pruning_lib.threshold(q, k, pruning, scale)
  return _dispatch(q, k, v, log_fgate, segment_ids, delta, scale=scale, impl=impl,
                   block_sizes=block_sizes, interpret=interpret, return_stats=return_stats)


def _dispatch(q, k, v, log_fgate, segment_ids, delta, *, scale, impl, block_sizes, interpret,
              return_stats):
  """The op with the ACP threshold ``delta`` [B, Hq] (or None) given: validated inputs, int32
  or 64-bit segment ids, ``scale`` a float. What a caller that computes the threshold over a
  wider sequence (a sequence-parallel op) runs."""
  if impl == "reference":
    o, lse = forgetting_attention_reference(q, k, v, log_fgate, segment_ids=segment_ids,
                                            sm_scale=scale, prune_threshold=delta)
    return (o, AttentionStats(lse.astype(jnp.float32))) if return_stats else o

  cfg = _Config(impl, scale, block_sizes, bool(interpret))
  o, lse, kept, total = _blockwise(q, k, v, log_fgate, segment_ids, delta, cfg)
  return (o, AttentionStats(lse, kept, total)) if return_stats else o


def _check_eager_backend(impl: str, interpret: bool, arrays, table: Platforms = _TABLE) -> None:
  """Called on arrays, the op runs here and now: a Pallas impl for another backend fails
  early. Under a trace (jit) the platform is only known when the program is lowered,
  possibly for another machine (ahead-of-time), and the lowering decides (``_on_platform``)."""
  traced = any(isinstance(x, jax.core.Tracer) for x in arrays)
  if impl in table.backends and not interpret and not traced:
    if jax.default_backend() != table.backends[impl]:
      raise ValueError(_needs_backend(impl, f"this one is {jax.default_backend()!r}",
                                      table.backends[impl], impl in table.interpret))


def _needs_backend(impl: str, where: str, backend: Optional[str] = None,
                   interpretable: bool = True) -> str:
  backend = backend or _BACKENDS[impl]
  hint = "; pass interpret=True to run it on the CPU" if interpretable else ""
  return f"impl={impl!r} needs a {backend.upper()} backend ({where}){hint}"


def _forward(impl: str, cfg: _Config):
  """impl's forward on c: o, lse, kept tiles and causal tiles ([B, Hq] int32) at its tiles,
  and the log-sum-exp its backward reads."""

  def forward(q, k, v, c_hi, c_lo, segment_ids, delta):
    bs = cfg.block_sizes or registry.default_block_sizes(impl, q.shape[-1])
    o, lse, kept, lse_res = registry.module(impl).forward(
        q, k, v, c_hi, c_lo, segment_ids, delta, sm_scale=cfg.sm_scale, block_sizes=bs,
        interpret=cfg.interpret)
    total = pruning_lib.causal_tiles(q.shape[1], k.shape[1], bs.block_q, bs.block_k)
    return o, lse, kept.astype(jnp.int32), jnp.full(kept.shape, total, jnp.int32), lse_res

  return forward


def _backward(impl: str, cfg: _Config):
  """impl's backward: dq, dk, dv and dc (see the module docstring)."""

  def backward(q, k, v, c_hi, c_lo, segment_ids, delta, o, lse_res, do, dlse):
    bs = cfg.block_sizes or registry.default_block_sizes(impl, q.shape[-1])
    return registry.module(impl).backward(
        q, k, v, c_hi, c_lo, segment_ids, delta, o, lse_res, do, dlse, sm_scale=cfg.sm_scale,
        block_sizes=bs, interpret=cfg.interpret)

  return backward


def _on_platform(cfg: _Config, make, out_shapes, *args, table: Platforms = _TABLE):
  """``make(impl)(*args)`` for the implementation that runs where the program is lowered.

  ``lax.platform_dependent`` traces every branch but lowers only the ones of the lowering
  platforms, so a program traced on a CPU host lowers for a TPU or a GPU (ahead-of-time)
  with that platform's kernels. "auto": ``table.auto`` (for the forgetting op pallas_gpu on
  cuda / rocm, pallas_tpu on tpu), ``table.fallback`` (xla) elsewhere. An explicit impl bound
  to a backend gets, on every other platform, a branch whose lowering raises the ValueError
  an eager call on that backend raises (with ``interpret`` a Pallas one runs wherever it is
  lowered). ``out_shapes``: the outputs' ShapeDtypeStructs, for that branch. ``table``: the
  forgetting op's, or the plain op's (``plain``).
  """
  if cfg.impl == "auto":
    branches = {p: make(i) for p, i in table.auto.items()}
    return jax.lax.platform_dependent(*args, **branches, default=make(table.fallback))
  if cfg.impl not in table.platforms or (cfg.interpret and cfg.impl in table.interpret):
    return make(cfg.impl)(*args)
  run = make(cfg.impl)
  unavailable = lambda *_: tuple(_unavailable_p.bind(
      impl=cfg.impl, shapes=tuple((s.shape, jnp.dtype(s.dtype)) for s in out_shapes),
      backend=table.backends[cfg.impl], interpretable=cfg.impl in table.interpret))
  return jax.lax.platform_dependent(*args, **{p: run for p in table.platforms[cfg.impl]},
                                    default=unavailable)


# The branch of a Pallas impl for the platforms it does not compile for: it has the outputs'
# shapes for tracing, and lowering it is an error. ``backend`` / ``interpretable`` (for the
# message) default to the forgetting op's line of ``impl``.
_unavailable_p = Primitive("forgetting_attention_unavailable")
_unavailable_p.multiple_results = True
_unavailable_p.def_abstract_eval(
    lambda *, impl, shapes, **_: [jax.core.ShapedArray(s, d) for s, d in shapes])


def _unavailable_lowering(ctx, *, impl, shapes, backend=None, interpretable=True):
  platforms = ", ".join(repr(p) for p in ctx.module_context.platforms)
  raise ValueError(_needs_backend(impl, f"this program is lowered for {platforms}", backend,
                                  interpretable))


mlir.register_lowering(_unavailable_p, _unavailable_lowering)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _blockwise(q, k, v, log_fgate, segment_ids, delta, cfg):
  """One compiled program per configuration, so eager callers don't dispatch op by op
  (inside a user's jit this inlines)."""
  if segment_ids is not None:
    segment_ids = _int32_segment_ids(segment_ids)
  # f = 0 and gates small enough to zero every weight they touch: see common ("zero gates").
  log_fgate = common.floor_log_fgate(log_fgate, common.gate_floor(q, k, cfg.sm_scale))
  return _attention(q, k, v, log_fgate, segment_ids, delta, cfg)


def _int32_segment_ids(segment_ids: jax.Array) -> jax.Array:
  """[B, S] int32 ids equal exactly where ``segment_ids`` are equal (the kernels read int32).

  Ids of up to 32 bits are cast (uint32 wraps around, which keeps every equality). 64-bit ids
  (jax_enable_x64) would merge ids that differ only above bit 32, so they are ranked within
  each row instead: a sort, order-preserving, so sorted ids stay sorted for the tile ranges.
  """
  if jnp.dtype(segment_ids.dtype).itemsize <= 4:
    return segment_ids.astype(jnp.int32)
  B, S = segment_ids.shape
  order = jnp.argsort(segment_ids, axis=1)  # [B, S]
  ranked = jnp.take_along_axis(segment_ids, order, axis=1)
  new = jnp.concatenate([jnp.zeros((B, 1), jnp.int32),
                         (ranked[:, 1:] != ranked[:, :-1]).astype(jnp.int32)], axis=1)
  dense = jnp.cumsum(new, axis=1, dtype=jnp.int32)  # rank of each sorted id
  return jnp.zeros((B, S), jnp.int32).at[jnp.arange(B)[:, None], order].set(dense)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, log_fgate, segment_ids, delta, cfg):
  return _attention_fwd(q, k, v, log_fgate, segment_ids, delta, cfg)[0]


def _attention_fwd(q, k, v, log_fgate, segment_ids, delta, cfg):
  c_hi, c_lo = common.compensated_cumsum(log_fgate, axis=1)
  B, T, Hq, _ = q.shape
  sd = jax.ShapeDtypeStruct
  shapes = (sd(q.shape, q.dtype), sd((B, Hq, T), jnp.float32), sd((B, Hq), jnp.int32),
            sd((B, Hq), jnp.int32), sd((B, Hq, T), jnp.float32))
  o, lse, kept, total, lse_res = _on_platform(cfg, functools.partial(_forward, cfg=cfg),
                                              shapes, q, k, v, c_hi, c_lo, segment_ids, delta)
  return (o, lse, kept, total), (q, k, v, c_hi, c_lo, segment_ids, delta, o, lse_res)


def _attention_bwd(cfg, res, cotangents):
  q, k, v, c_hi, c_lo, segment_ids, delta, o, lse_res = res
  do, dlse = cotangents[:2]
  sd = jax.ShapeDtypeStruct
  shapes = (sd(q.shape, q.dtype), sd(k.shape, k.dtype), sd(v.shape, v.dtype),
            sd(c_hi.shape, jnp.float32))
  dq, dk, dv, dc = _on_platform(cfg, functools.partial(_backward, cfg=cfg), shapes,
                                q, k, v, c_hi, c_lo, segment_ids, delta, o, lse_res,
                                do.astype(q.dtype), dlse.astype(jnp.float32))
  dlog_f = common.reverse_cumsum(dc, axis=1)
  return dq, dk, dv, dlog_f, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)

"""Pieces shared by every implementation: the cumulative log forget gate, block sizes, stats.

The decay bias D_ij = c_i - c_j is a difference of two cumulative sums that grow without
bound (|c| ~ 1e5 at 64k tokens with strong forgetting), so a plain float32 ``c`` loses the
digits that matter for nearby tokens. Every implementation therefore receives ``c`` as an
unevaluated float32 pair ``(c_hi, c_lo)`` with ``c ~= c_hi + c_lo`` to about 2^-48 relative,
and forms ``D_ij = (c_hi_i - c_hi_j) + (c_lo_i - c_lo_j)``: for nearby tokens the first
difference is exact (Sterbenz), so D keeps full float32 relative precision where it matters.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _two_sum(a, b):
  """Error-free transformation: a + b == s + e exactly (Knuth)."""
  s = a + b
  bb = s - a
  e = (a - (s - bb)) + (b - bb)
  return s, e


def compensated_cumsum(x: jax.Array, axis: int = 1) -> tuple[jax.Array, jax.Array]:
  """Inclusive cumulative sum of float32 ``x`` along ``axis`` as a double-float pair.

  Returns ``(hi, lo)`` in float32 with ``hi + lo`` equal to the exact prefix sums up to a
  relative error of a few 2^-48. Works on every backend (no float64 needed). Narrower floats
  are summed as float32, float64 ``x`` (x64) as a float64 pair.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))

  def combine(left, right):
    return add_pairs(*left, *right)

  return jax.lax.associative_scan(combine, (x, jnp.zeros_like(x)), axis=axis)


def add_pairs(a_hi, a_lo, b_hi, b_lo) -> tuple[jax.Array, jax.Array]:
  """(a_hi + a_lo) + (b_hi + b_lo) as a renormalised double-float pair (hi, lo).

  The step of ``compensated_cumsum``; also how a running c is extended one token at a time
  (cached decoding) without ever recomputing the cumsum.
  """
  s, e = _two_sum(a_hi, b_hi)
  e = e + (a_lo + b_lo)
  return _two_sum(s, e)


# ----------------------------------------------------------------------------- zero gates
#
# f_t = 0 (log f_t = -inf) must cut every pair (i, j) with j < t <= i to weight exactly 0,
# but -inf in c gives -inf - (-inf) = NaN for the pairs after t (and TwoSum turns it into
# NaN everywhere), and a finite log f of -3e38 overflows the sum. The blockwise
# implementations floor log f at F = -(2U + ZERO_GATE_MARGIN) per batch x head, U >=
# |scale q_i . k_j|: a pair crossing the floored gate has logit s_ij + D_ij <= U + F, its
# row's maximum is at least s_ii >= -U (D_ii = 0, the own key is always visible), so its
# weight is at most exp(-ZERO_GATE_MARGIN), which is exactly 0 in float32, as for f = 0.
# Pairs that do not cross it never see the floored value. Gates below F give weight 0 with
# or without the floor, so flooring them changes no result, and their gradient is 0 both
# ways (the weights they touch are exact zeros). NaN gates pass through (NaN < F is false).

# exp(-128) = 2.6e-56 and 2^(-128 log2 e) = 2^-184.7: far below float32's smallest
# denormal (2^-149), with room for the float32 rounding of logits near |F|.
ZERO_GATE_MARGIN = 128.0


def bound_margin(head_dim: int) -> float:
  """Relative margin that keeps a Cauchy-Schwarz bound |scale q.k| <= |scale| |q| |k| a bound
  in float32: the rounding of the two norms (each within (D/2 + 3) 2^-24 relative, the 3 for
  the scaling in ``row_norms``), of the kernels' length-D dot products (D 2^-24 relative to
  |q| |k|) and of the products forming U."""
  return 1.0 + (head_dim + 2) * 2.0 ** -22


def row_norms(x: jax.Array) -> jax.Array:
  """Euclidean norms of the rows of ``x`` [..., D] in float32, [...].

  Each row is divided by its largest |x| before squaring, so the norm is inf only when it
  exceeds float32 itself: squaring directly overflows for elements above ~1.8e19 (a finite
  row would get an infinite norm) and flushes elements below ~1e-19 to zero (a bound would
  come out too small). A row holding a NaN gets NaN, one holding an infinity (no NaN) inf.
  """
  x = x.astype(jnp.float32)
  m = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  # Zero and non-finite rows are left unscaled: their norm (0, inf, NaN) comes out as is.
  s = jnp.where((m > 0) & (m < jnp.inf), m, 1.0)
  return s[..., 0] * jnp.sqrt(jnp.sum(jnp.square(x / s), axis=-1))


def gate_floor(q: jax.Array, k: jax.Array, sm_scale: float, axis_name=None) -> jax.Array:
  """F = -(2U + ZERO_GATE_MARGIN), [B, Hq] float32, without gradient.

  With ``axis_name`` (inside ``shard_map``), q and k are this device's part of a sequence
  sharded over that mesh axis, and U is taken over the whole sequence.

  U = |scale| max_t |q_t| max_t |k_t| (Cauchy-Schwarz, with ``bound_margin``) over the rows
  of q and k whose elements are all finite: a row with a NaN or an infinity gives non-finite
  logits of its own anyway, and must not turn F into NaN for the whole head (NaN < F is
  false, so no zero gate would be floored). A finite row counts even when its norm is huge.

  Where U or 2U + 128 overflows float32, F is -inf: nothing is floored, so a zero gate in
  that head makes c, and every result that depends on it, NaN (loud), and the other gates
  enter c as they are. A finite F computed from fewer rows would leave large weights on
  pairs across a zero gate: finite, wrong numbers.
  """
  Hq, Hkv, D = q.shape[2], k.shape[2], q.shape[3]

  def finite_max_norm(x):  # [B, N, H, D] -> [B, H]
    n = row_norms(x)
    m = jnp.max(jnp.where(jnp.all(jnp.isfinite(x), axis=-1), n, 0.0), axis=1)
    return m if axis_name is None else jax.lax.pmax(jax.lax.stop_gradient(m), axis_name)

  u = (abs(sm_scale) * bound_margin(D)) * finite_max_norm(q) * jnp.repeat(
      finite_max_norm(k), Hq // Hkv, axis=1)
  f = -(2.0 * u + ZERO_GATE_MARGIN)
  # 0 * inf (a zero q against an overflowing k norm) is NaN; NaN would floor nothing too,
  # but -inf says so.
  return jax.lax.stop_gradient(jnp.where(jnp.isnan(f), -jnp.inf, f))


def floor_log_fgate(log_fgate: jax.Array, floor: jax.Array) -> jax.Array:
  """max(log_fgate, floor) with NaN kept and zero gradient below the floor.

  log_fgate: [B, S, Hq]; floor: [B, Hq].
  """
  f = floor[:, None, :]
  return jnp.where(log_fgate < f, f, log_fgate)


def reverse_cumsum(x: jax.Array, axis: int = 1) -> jax.Array:
  """sum_{s >= t} x_s along ``axis``, as a true reverse scan (no ``total - prefix``)."""
  return jax.lax.cumsum(x, axis=axis, reverse=True)


# ----------------------------------------------------------------------------- chunks
#
# The chunk contract. The single-device op computes the last T of S queries against all S
# keys; a sequence-parallel op computes one device's queries against any device's keys. Both
# are a pair of chunks that know where their tokens sit in the whole sequence: global
# positions (strictly increasing within a chunk; masks compare them, and a query's own key
# is the key at its position) and the global cumulative gate c at every token, so that
# D_ij = c_i - c_j is the exact global decay wherever the two chunks are.


class Rows(NamedTuple):
  """The query side of a chunk pair."""

  q: jax.Array  # [B, T, Hq, D]
  c_hi: jax.Array  # [B, T, Hq] f32 global cumulative log gate at the queries (double-float);
  c_lo: jax.Array  # [B, T, Hq] f32      None in both for no gate (``xla``'s plain attention)
  seg: Optional[jax.Array]  # [B, T] int32 segment ids, or None
  pos: jax.Array  # [T] int32 global positions (>= 0), strictly increasing


class Cols(NamedTuple):
  """The key side of a chunk pair; k and v in GQA form (Hkv heads, never repeated)."""

  k: jax.Array  # [B, S, Hkv, D]
  v: jax.Array  # [B, S, Hkv, D]
  c_hi: jax.Array  # [B, S, Hq] f32 (None: no gate, with Rows.c_hi)
  c_lo: jax.Array  # [B, S, Hq] f32
  seg: Optional[jax.Array]  # [B, S] int32, or None (with Rows.seg)
  pos: jax.Array  # [S] int32 global positions (>= 0), strictly increasing


def whole_sequence(q, k, v, c_hi, c_lo, segment_ids) -> tuple[Rows, Cols]:
  """The single-device op as a chunk pair: the queries are the last T of the S keys.

  ``c_hi = c_lo = None``: no gate (the plain attention of ``xla.plain_forward``)."""
  T, S = q.shape[1], k.shape[1]
  off = S - T
  seg_q = None if segment_ids is None else segment_ids[:, off:]
  c_q = [None if c is None else c[:, off:] for c in (c_hi, c_lo)]
  rows = Rows(q, *c_q, seg_q, off + jnp.arange(T, dtype=jnp.int32))
  return rows, Cols(k, v, c_hi, c_lo, segment_ids, jnp.arange(S, dtype=jnp.int32))


# ----------------------------------------------------------------------------- anchored dS
#
# The backward never forms dS_ij = P_ij (dP_ij - di_i) from di_i = o_i . do_i - dlse_i: under
# strong forgetting P_ii ~ 1, o_i ~ v_i, and dP_ij - di_i cancels below the rounding of the
# stored output. Every implementation anchors dS at the query's own key instead,
#
#   X_ij = dP_ij - dd_i   (dd_i = dP_ii = do_i . v_i, so X_ii = 0 exactly),
#   g_i  = sum_j P_ij X_ij - dlse_i,       dS_ij = P_ij (X_ij - g_i),
#
# with g_i summed over the backward's own P and X, which keeps sum_j dS_ij = dlse_i to
# rounding. A pass that must form dS before it has swept a row (the Pallas dQ kernels) uses
# the estimate g~_i = o_i . do_i - dd_i - dlse_i (``row_term_estimate``) and anchors k the same
# way, using that the exact dS rows sum to dlse:
#
#   dq_i / scale = sum_{j != i} dS_ij (k_j - k_i) + dlse_i k_i.
#
# With g~ in place of g this is off by (g_i - g~_i) sum_{j != i} P_ij (k_j - k_i): the error
# of g~ (the rounding of o) times a factor that vanishes with 1 - P_ii, so dq keeps its
# relative precision under strong forgetting, and the dQ pass needs no P K matmul.


def own_key_dot(do: jax.Array, v: jax.Array) -> jax.Array:
  """dd_i = do_i . v_i with v at the query's own position (the anchor of dS).

  do: [B, T, Hq, D]; v: [B, S, Hkv, D] whose last T positions are the queries' own (the
  single-device op; a sequence-parallel device passes its own chunk, S = T); [B, Hq, T]
  float32 (float64 for float64 inputs).
  """
  B, T, Hq, D = do.shape
  S, Hkv = v.shape[1], v.shape[2]
  v_own = v[:, S - T:].reshape(B, T, Hkv, 1, D)
  dd = jnp.einsum("bthgd,bthgd->bhgt", do.reshape(B, T, Hkv, Hq // Hkv, D), v_own,
                  preferred_element_type=jnp.promote_types(do.dtype, jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return dd.reshape(B, Hq, T)


def row_term_estimate(o: jax.Array, do: jax.Array, dd: jax.Array, dlse: jax.Array) -> jax.Array:
  """g~_i = o_i . do_i - dd_i - dlse_i, [B, Hq, T] float32 (o, do: [B, T, Hq, D]; dd, dlse:
  [B, Hq, T]); the estimate of g in the comment above."""
  di = jnp.einsum("bthd,bthd->bht", o, do, preferred_element_type=jnp.float32,
                  precision=jax.lax.Precision.HIGHEST)
  return di - dd - dlse.astype(jnp.float32)


def finite_number(value, name: str) -> float:
  """``value`` as a Python float: a Python, numpy or concrete JAX real scalar that is finite.

  Strings, booleans, arrays with elements and traced values raise a ValueError naming ``name``.
  """
  if isinstance(value, (bool, np.bool_, str, bytes)) or isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  if not isinstance(value, numbers.Real):
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape != () or dtype is None or not (jnp.issubdtype(dtype, jnp.floating)
                                            or jnp.issubdtype(dtype, jnp.integer)):
      raise ValueError(f"{name} must be a finite number, got {value!r}")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  return value


def _positive_int(value, name: str, power_of_two: bool) -> int:
  """``value`` as a Python int (integral floats, numpy and JAX scalars too), or a ValueError."""
  what = "a positive power of two" if power_of_two else "a positive integer"
  n = None
  # A concrete 0-d JAX array (jnp.float32(16)) counts like the numpy scalar it holds.
  if (isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
      and value.shape == ()):
    value = value.item()
  if not isinstance(value, (bool, np.bool_)):
    try:
      n = operator.index(value)
    except TypeError:
      if isinstance(value, numbers.Real) and float(value).is_integer():
        n = int(value)
  if n is None or n < 1 or (power_of_two and n & (n - 1)):
    raise ValueError(f"{name} must be {what}, got {value!r}")
  return n


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the blockwise implementations.

  ``block_q`` x ``block_k`` is the forward tile; the backward passes use
  ``block_q_bwd`` x ``block_k_bwd`` (defaulting to the forward sizes). ``num_warps`` and
  ``num_stages`` are Triton launch parameters (GPU only; None = implementation default).
  """

  block_q: int = 128
  block_k: int = 128
  block_q_bwd: Optional[int] = None
  block_k_bwd: Optional[int] = None
  num_warps: Optional[int] = None
  num_stages: Optional[int] = None

  def __post_init__(self):
    # Stored as Python ints, so that 16.0 and np.int64(16) give the same (hashable) tiles.
    for f in dataclasses.fields(self):
      val = getattr(self, f.name)
      if val is None and f.name not in ("block_q", "block_k"):
        continue
      object.__setattr__(self, f.name, _positive_int(val, f"block_sizes.{f.name}",
                                                     power_of_two=f.name.startswith("block")))

  @property
  def bwd(self) -> tuple[int, int]:
    return (self.block_q_bwd or self.block_q, self.block_k_bwd or self.block_k)


class AttentionStats(NamedTuple):
  """What ``return_stats=True`` gives beside the output.

  lse: [B, Hq, T] float32 log-sum-exp of each query's (scaled, biased) logits.
  kept_tiles: [B, Hq] int32 forward tiles computed, or None for the element-wise reference.
  total_tiles: [B, Hq] int32 tiles the causal, unpruned, unsegmented kernel computes with
    the same block sizes, or None for the reference.
  """

  lse: jax.Array
  kept_tiles: Optional[jax.Array] = None
  total_tiles: Optional[jax.Array] = None

  def kept_fraction(self, per_head: bool = False) -> jax.Array:
    """Computed tiles over causal tiles: a scalar summed over batch and heads, or [B, Hq].

    Every forward tile costs the same 4 * block_q * block_k * D FLOPs, so this is the
    fraction of the causal kernel's attention FLOPs that were spent (1 - it was saved).
    """
    if self.kept_tiles is None or self.total_tiles is None:
      raise ValueError("tile counts come from the blockwise implementations, not 'reference'")
    kept = self.kept_tiles.astype(jnp.float32)
    total = self.total_tiles.astype(jnp.float32)
    if per_head:
      return kept / total
    return jnp.sum(kept) / jnp.sum(total)

  def tile_summary(self) -> str:
    """One line for logs, e.g. 'kept 1234 of 8192 tiles (15.1%)' (not under jit)."""
    self.kept_fraction()
    kept = int(jnp.sum(self.kept_tiles))
    total = int(jnp.sum(self.total_tiles))
    return f"kept {kept} of {total} tiles ({100.0 * kept / max(total, 1):.1f}%)"

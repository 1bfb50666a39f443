"""Plain causal attention (no forget gate) in plain JAX: the ``xla`` line of ``registry.PLAIN``.

The blockwise forgetting kernels of ``xla`` with no cumulative gate (``c = None``, static):
the same online-softmax forward over the kept kv blocks (causal order and segments, no
decay loaded or added) and the textbook flash backward in one pass (dS = P (dP - Delta),
Delta_i = dO_i . o_i; no row-terms pass, no dc), so memory stays O(T block) and a
Transformer baseline on this backend pays for no decay. Runs on every backend; the default
off GPU and TPU.

Shapes: q [B, T, Hq, D] (the last T of the S positions), k, v [B, S, Hkv, D] (GQA, never
repeated), segment_ids [B, S] int32 or None; returns o [B, T, Hq, D] in q.dtype.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.forgetting_attention import xla
from pallas_kernels.forgetting_attention.common import BlockSizes

default_block_sizes = xla.default_block_sizes


def attention(q, k, v, segment_ids, *, sm_scale: float, block_sizes: BlockSizes,
              interpret: bool = False):
  """Causal softmax attention with equal-segment masking; differentiable (custom VJP)."""
  del interpret  # plain XLA: nothing to interpret
  return _attention(q, k, v, segment_ids, sm_scale, block_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, segment_ids, sm_scale, block_sizes):
  return xla.plain_forward(q, k, v, segment_ids, sm_scale=sm_scale, block_sizes=block_sizes)[0]


def _attention_fwd(q, k, v, segment_ids, sm_scale, block_sizes):
  o, lse = xla.plain_forward(q, k, v, segment_ids, sm_scale=sm_scale, block_sizes=block_sizes)
  return o, (q, k, v, segment_ids, o, lse)


def _attention_bwd(sm_scale, block_sizes, res, do):
  q, k, v, segment_ids, o, lse = res
  dq, dk, dv = xla.plain_backward(q, k, v, segment_ids, o, lse, do.astype(q.dtype),
                                  sm_scale=sm_scale, block_sizes=block_sizes)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)

"""Plain causal attention with segments on a GPU: the ``pallas_gpu`` line of ``registry.PLAIN``.

JAX's own Pallas flash attention for GPUs, ``jax.experimental.pallas.ops.gpu.attention.mha``
(Triton lowering; forward, and a fused dK/dV + dQ backward, each with its own tiles), with
``causal=True`` and its segment mask. It is the GPU path where cuDNN cannot go (segment ids,
float32; ``plain_cudnn``). Its constraints, met here:

- one segment-id array for queries and keys and a causal mask aligned at the top left, so
  the queries must be all S positions: q is padded in front with S - T zero rows when
  S > T (those outputs are dropped; the padded rows get the ids of their positions);
- T a multiple of every tile: the sequence is padded at the end to a multiple of the
  largest tile; padded keys come after every real query (causally invisible to them), padded
  queries carry the last real position's segment id (so they see a key and stay finite)
  and their outputs are dropped (zero cotangent, zero contribution to dK, dV);
- one head count for q, k, v: GQA repeats each kv head over its group (G x the k, v
  memory; the repeat's transpose sums the group's dK, dV);
- the backward's dQ q-tiles and dK/dV kv-tiles must split the sequence into the same
  number of blocks, so ``block_q_bwd == block_k_bwd`` (``check``).

Tiles (``BlockSizes``): forward ``block_q x block_k``; backward ``block_q_bwd x
block_k_bwd`` for both the dK/dV and the dQ pass; ``num_warps`` / ``num_stages`` as given
(None: the upstream heuristic / 2). The defaults are upstream's (128 x 128 forward, 32 x 32
backward), untuned here.

Float32: the upstream kernels' dots leave the precision to JAX's default, which the Triton
lowering turns into TF32 for float32 operands; on float32 inputs the kernels are traced,
forward and backward, under ``jax.default_matmul_precision("highest")`` (IEEE float32 dots,
``_float32_dots``), as this project's own kernels compute. Tested in interpret mode against
the float64 reference, by cuda lowering from a CPU and for the float32 dot precision in the
traced kernels (``tests/pallas_kernels/test_plain_attention.py``); not on GPU hardware.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.forgetting_attention.common import BlockSizes


def default_block_sizes(head_dim: int) -> BlockSizes:
  """Upstream's default tiles (``attention.BlockSizes.get_default()``), untuned here."""
  del head_dim
  return BlockSizes(block_q=128, block_k=128, block_q_bwd=32, block_k_bwd=32)


def check(q, k, segment_ids, block_sizes, interpret: bool) -> None:
  del q, k, segment_ids, interpret
  if block_sizes is not None and block_sizes.bwd[0] != block_sizes.bwd[1]:
    raise ValueError(f"block_sizes: impl='pallas_gpu' (plain) needs block_q_bwd == "
                     f"block_k_bwd, got {block_sizes.bwd}")


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def attention(q, k, v, segment_ids, *, sm_scale: float, block_sizes: BlockSizes,
              interpret: bool = False):
  """o [B, T, Hq, D] (q.dtype) from the upstream Pallas flash attention, causal, segments."""
  from jax.experimental.pallas.ops.gpu import attention as upstream

  B, T, Hq, D = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  bq, bk = block_sizes.block_q, block_sizes.block_k
  bq_bwd, bk_bwd = block_sizes.bwd
  n = _round_up(S, max(bq, bk, bq_bwd, bk_bwd))  # every tile divides n (powers of two)
  bq, bk, bq_bwd, bk_bwd = (min(b, n) for b in (bq, bk, bq_bwd, bk_bwd))
  tiles = upstream.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bq_bwd, block_kv_dkv=bk_bwd,
                              block_q_dq=bq_bwd, block_kv_dq=bk_bwd)
  pad = lambda x, front: jnp.pad(x, ((0, 0), (front, n - S), (0, 0), (0, 0)))
  q = pad(q, S - T)  # [B, n, Hq, D]: the queries at positions S - T .. S - 1
  k = jnp.repeat(pad(k, 0), Hq // Hkv, axis=2)
  v = jnp.repeat(pad(v, 0), Hq // Hkv, axis=2)
  seg = None
  if segment_ids is not None:
    last = segment_ids[:, -1:]
    seg = jnp.concatenate([segment_ids, jnp.broadcast_to(last, (B, n - S))], axis=1)
  mha = lambda q, k, v, seg: upstream.mha(
      q, k, v, seg, sm_scale=sm_scale, causal=True, block_sizes=tiles,
      num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages or 2,
      interpret=interpret)
  o = (_float32_dots(mha) if q.dtype == jnp.float32 else mha)(q, k, v, seg)
  return o[:, S - T:S]


def _float32_dots(mha):
  """``mha`` (q, k, v, segment ids) with every dot of its forward and backward traced at
  HIGHEST precision: the backward of the upstream custom VJP is traced when JAX transposes,
  outside any context of the caller, so this VJP re-enters the context around it."""

  @jax.custom_vjp
  def run(q, k, v, seg):
    with jax.default_matmul_precision("highest"):
      return mha(q, k, v, seg)

  def fwd(q, k, v, seg):
    with jax.default_matmul_precision("highest"):
      return jax.vjp(lambda q, k, v: mha(q, k, v, seg), q, k, v)

  def bwd(vjp, do):
    with jax.default_matmul_precision("highest"):
      return (*vjp(do), None)

  run.defvjp(fwd, bwd)
  return run

"""Plain causal attention on a TPU: the ``pallas_tpu`` line of ``registry.PLAIN``.

JAX's splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``, Mosaic TPU
kernels: forward, dQ and dK/dV) with a causal mask and its segment ids. Splash skips the
tiles above the diagonal from the mask (``CausalMask``, processed on the host once per
shape) and masks segments element-wise. How the op's layout meets it:

- heads first: q [Hq, T, D], k, v [Hkv, S, D] per batch row, the batch vmapped; GQA is
  native (kv head h // (Hq / Hkv));
- S > T: ``CausalMask(offset=S - T)``, so query r sits at position S - T + r;
- no logit scale: q is multiplied by ``sm_scale`` first (in q's dtype);
- lengths a multiple of every tile: T and S are padded at the end; padded keys lie after
  every real query (causally invisible to them), padded queries carry the last real
  query's segment id (so each sees a key and stays finite) and their outputs are dropped.

Tiles (``BlockSizes``, multiples of 128; ``check``): forward ``block_q x block_k`` (kv compute
tile = ``block_k``), backward ``block_q_bwd x block_k_bwd`` for both the dK/dV and the dQ
kernel; each shrinks to the padded length when the sequence is shorter. The default 512 x
512 (MaxText's) is untuned here. Tested in TPU interpret mode against the float64 reference
and by tpu lowering from a CPU (``tests/pallas_kernels/test_plain_attention.py``), not on TPU
hardware.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.forgetting_attention.common import BlockSizes

LANES = 128  # splash's kv tiles are whole lanes; q tiles are kept to the same unit here


def default_block_sizes(head_dim: int) -> BlockSizes:
  del head_dim
  return BlockSizes(block_q=512, block_k=512)


def check(q, k, segment_ids, block_sizes, interpret: bool) -> None:
  del q, k, segment_ids, interpret
  if block_sizes is None:
    return
  tiles = dict(block_q=block_sizes.block_q, block_k=block_sizes.block_k,
               block_q_bwd=block_sizes.bwd[0], block_k_bwd=block_sizes.bwd[1])
  for name, b in tiles.items():
    if b % LANES:
      raise ValueError(f"block_sizes.{name}: impl='pallas_tpu' (plain, splash) needs tiles "
                       f"that are multiples of {LANES}, got {b}")


def _fit(block: int, n: int) -> int:
  """``block``, or ``n`` rounded up to whole lanes when the sequence is shorter."""
  return min(block, -(-n // LANES) * LANES)


def _padded(n: int, *tiles: int) -> int:
  m = math.lcm(*tiles)
  return -(-n // m) * m


@functools.lru_cache(maxsize=64)
def _kernel(T: int, S: int, offset: int, num_heads: int, tiles: tuple, interpret: bool):
  """The splash kernel for padded lengths T x S and causal offset (host mask processing,
  once per shape). Its mask tables are made concrete (``ensure_compile_time_eval``), not
  tracers of the trace that first asked for it, so the cached kernel serves every trace."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  bq, bk, bq_bwd, bk_bwd = tiles
  mask = sm.MultiHeadMask([sm.CausalMask((T, S), offset=offset)] * num_heads)
  block_sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                              block_q_dkv=bq_bwd, block_kv_dkv=bk_bwd,
                              block_kv_dkv_compute=bk_bwd, block_q_dq=bq_bwd,
                              block_kv_dq=bk_bwd)
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def attention(q, k, v, segment_ids, *, sm_scale: float, block_sizes: BlockSizes,
              interpret: bool = False):
  """o [B, T, Hq, D] (q.dtype) from splash attention, causal, segments."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  B, T, Hq, D = q.shape
  S = k.shape[1]
  bq, bq_bwd = _fit(block_sizes.block_q, T), _fit(block_sizes.bwd[0], T)
  bk, bk_bwd = _fit(block_sizes.block_k, S), _fit(block_sizes.bwd[1], S)
  Tp, Sp = _padded(T, bq, bq_bwd), _padded(S, bk, bk_bwd)
  kernel = _kernel(Tp, Sp, S - T, Hq, (bq, bk, bq_bwd, bk_bwd), bool(interpret))
  heads_first = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))
                                     ).transpose(0, 2, 1, 3)  # [B, H, n, D]
  qs = heads_first((q * sm_scale).astype(q.dtype), Tp)
  ks, vs = heads_first(k, Sp), heads_first(v, Sp)
  if segment_ids is None:
    o = jax.vmap(kernel)(qs, ks, vs)
  else:
    fill = lambda x, n: jnp.concatenate(
        [x, jnp.broadcast_to(x[:, -1:], (B, n - x.shape[1]))], axis=1)
    seg_q, seg_k = fill(segment_ids[:, S - T:], Tp), fill(segment_ids, Sp)
    o = jax.vmap(lambda q, k, v, sq, sk_: kernel(q, k, v, segment_ids=sk.SegmentIds(sq, sk_)))(
        qs, ks, vs, seg_q, seg_k)
  return o.transpose(0, 2, 1, 3)[:, :T]

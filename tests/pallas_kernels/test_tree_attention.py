"""Tree attention (decoding against a sequence-sharded KV cache) on 8 simulated devices
equals the single-device op: o and lse of a few new queries, a cache only partly filled (so
some devices hold no visible key), contiguous and round-robin cache layouts, ACP, NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import Pruning
from pallas_kernels.forgetting_attention import common, forgetting_attention, pruning
from pallas_kernels.forgetting_attention.common import BlockSizes, Cols, Rows
from pallas_kernels.sequence_parallel import Layout, permute
from pallas_kernels.sequence_parallel.tree import tree_attention
from tests.kernel_utils import make_log_fgate
from tests.tolerances import assert_close

B, BUF, HQ, HKV, D = 2, 256, 4, 2, 16


def _case(filled, T, gate, seed):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, HQ, D)).astype(np.float32)
  k = rng.normal(size=(B, BUF, HKV, D)).astype(np.float32)
  v = rng.normal(size=(B, BUF, HKV, D)).astype(np.float32)
  lf = make_log_fgate(rng, B, BUF, HQ, gate)
  return q, k, v, lf


def _single_device(q, k, v, lf, filled, delta_pruning):
  """The op with the T queries the last of the ``filled`` cached positions."""
  return forgetting_attention(q, k[:, :filled], v[:, :filled], lf[:, :filled], impl="xla",
                              pruning=delta_pruning, return_stats=True)


def _tree(q, k, v, lf, filled, layout_name, prune):
  T = q.shape[1]
  mesh = Mesh(np.array(jax.devices()[:8]), ("context",))
  layout = Layout(layout_name, BUF, 8)
  c_hi, c_lo = common.compensated_cumsum(jnp.asarray(lf), axis=1)  # the cache's c
  pos = jnp.asarray(layout.order)
  qpos = jnp.arange(filled - T, filled, dtype=jnp.int32)
  rows = Rows(jnp.asarray(q), c_hi[:, filled - T:filled], c_lo[:, filled - T:filled], None, qpos)
  delta = (None if prune is None else
           pruning.threshold(jnp.asarray(q), jnp.asarray(k[:, :filled]), prune, D ** -0.5,
                             num_keys=filled))
  seq = P(None, "context")

  def local(k, v, c_hi, c_lo, pos):
    cols = Cols(k, v, c_hi, c_lo, None, pos)
    return tree_attention(rows, cols, delta, axis_name="context", sm_scale=D ** -0.5,
                          block_sizes=BlockSizes(16, 16))

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, seq, P("context")),
                             out_specs=(P(), P()), check_vma=False))
  # Slots past the filled length hold stale values at later positions: masked.
  return fn(*(permute(jnp.asarray(x), layout) for x in (k, v, c_hi, c_lo)), pos)


@pytest.mark.parametrize("layout,pruned", [("contiguous", True), ("striped", False)])
def test_equals_single_device(layout, pruned):
  filled, T = 150, 3  # devices holding slots >= 160 (contiguous) see no key
  q, k, v, lf = _case(filled, T, "strong" if pruned else "medium", seed=1)
  prune = Pruning(log_tolerance=-10.0) if pruned else None
  o, lse = _tree(q, k, v, lf, filled, layout, prune)
  want_o, stats = _single_device(q, k, v, lf, filled, prune)
  assert_close(np.asarray(o), np.asarray(want_o, np.float64), np.float32, "o")
  assert_close(np.asarray(lse), np.asarray(stats.lse, np.float64), np.float32, "lse")


def test_nan_key_gives_nan_rows():
  filled, T = 150, 2
  q, k, v, lf = _case(filled, T, "medium", seed=2)
  k[0, 40, 1, 0] = np.nan
  o, _ = _tree(q, k, v, lf, filled, "contiguous", None)
  o = np.asarray(o)
  assert np.all(np.isnan(o[0, :, 2:]))  # q heads of kv head 1, batch row 0
  assert np.all(np.isfinite(o[1])) and np.all(np.isfinite(o[0, :, :2]))


def test_needs_chunk_kernels():
  rows = Rows(jnp.zeros((1, 1, 2, 16)), jnp.zeros((1, 1, 2)), jnp.zeros((1, 1, 2)), None,
              jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="impl='triton' has no chunk kernels"):
    tree_attention(rows, None, None, axis_name="context", sm_scale=1.0, impl="triton")

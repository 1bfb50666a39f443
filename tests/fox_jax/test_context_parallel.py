"""Context parallelism in the model: a training step on a mesh with a 'context' axis equals
the same step on one device, for every strategy, FoX Pro and Transformer Pro, with ACP;
the key/value shift's halo; evaluation in natural order; resume across meshes; bad configs.

The batch is built by hand so that every case has what stresses the layouts: a document
spanning every shard, documents starting at shard boundaries and inside them, padding.
"""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fox_jax import context as context_lib
from fox_jax import evaluate, run_config, sharding
from fox_jax.config import get_preset
from fox_jax import train as train_lib
from fox_jax.data import Batch
from fox_jax.errors import UsageError
from pallas_kernels.sequence_parallel import layouts
from tests.tolerances import assert_close

T, B = 128, 4
ONE = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
C8 = {"data": 1, "fsdp": 1, "context": 8, "tensor": 1}
D2C4 = {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
C4T2 = {"data": 1, "fsdp": 1, "context": 4, "tensor": 2}
ACP = {"log_tolerance": -6.0, "qk_bound": "auto"}


def _config(mesh, strategy="zigzag", preset="fox_pro_tiny", pruning=None, seq_len=T, **model):
  c = run_config.base_config()
  c.model.preset = preset
  # GQA 8 / 2 (Ulysses over 8 devices replicates the k/v heads); xla's chunk kernels
  # with 16-token tiles, so that shards hold several tiles.
  c.model.overrides.update({"num_layers": 1, "dtype": "float32", "attn_impl": "xla",
                            "num_heads": 8, "num_kv_heads": 2, "context_strategy": strategy,
                            "block_sizes": {"block_q": 16, "block_k": 16}, **model})
  if pruning is not None:
    c.model.overrides.pruning = pruning
  c.data.seq_len = seq_len
  c.data.global_batch = B
  c.optim.warmup_tokens = 256
  c.optim.total_tokens = 4096
  # AdamW's first update is g / (|g| + eps): with eps 1e-8, gradient elements of ~1e-8
  # (rarely seen vocabulary rows) turn float32 roundoff, which depends on the order of the
  # sums and so on the mesh, into O(1) relative differences of their update. With eps
  # 1e-6 the update is a well-conditioned function of the gradient, and comparing the
  # updated parameters compares the gradients.
  c.optim.eps = 1e-6
  c.mesh.update(mesh)
  return c


def _segments() -> np.ndarray:
  """[B, T]: one document over the whole row; documents of 5, 40, 83 tokens (the 83 cross
  every shard boundary after 45); two documents and padding (0); 16 documents of 8, each
  starting on a zigzag chunk boundary."""
  rows = [[1] * T, [1] * 5 + [2] * 40 + [3] * 83, [1] * 60 + [2] * 60 + [0] * 8,
          np.repeat(np.arange(1, 17), 8).tolist()]
  return np.asarray(rows, np.int32)


def _batch() -> Batch:
  seg = _segments()
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 259, (B, T)).astype(np.int32)
  targets = np.where(seg > 0, rng.integers(0, 259, (B, T)), 0).astype(np.int32)
  pos = np.zeros_like(seg)
  for b in range(B):
    for t in range(1, T):
      pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
  return Batch(inputs, targets, seg, pos, (seg > 0).astype(np.float32))


def _device_batch(setup, batch: Batch) -> Batch:
  sh = setup.batch_sharding()
  return Batch(*(jax.device_put(x[None], sh) for x in batch))


@functools.lru_cache(maxsize=None)
def _host_state(preset):
  setup = train_lib.build(_config(ONE, preset=preset), jax.devices()[:1])
  return jax.device_get(train_lib.init_state(setup, seed=0))


@functools.lru_cache(maxsize=None)
def _step(mesh_items, strategy, preset, acp, seq_chunk=None):
  """(metrics, params) of one step from the shared initial state, on the mesh given.

  With ``acp``, ACP prunes and the tiles are 8 tokens, the length of a zigzag chunk on 8
  devices, so that zigzag's tiles are the one-device tiles.
  """
  mesh = dict(mesh_items)
  devices = jax.devices()[:1] if mesh == ONE else jax.devices()
  extra = {"block_sizes": {"block_q": 8, "block_k": 8}} if acp else {}
  if seq_chunk is not None:
    extra["seq_chunk"] = seq_chunk
  setup = train_lib.build(_config(mesh, strategy, preset, ACP if acp else None, **extra),
                          devices)
  state = jax.device_put(_host_state(preset), setup.state_shardings)
  state, metrics = setup.train_step(state, _device_batch(setup, _batch()), 1e-3)
  return jax.device_get(metrics), jax.device_get(state["params"])


def _assert_step_equal(got, want):
  (m, p), (m1, p1) = got, want
  assert bool(m["finite"])
  assert_close(m["loss"], m1["loss"], jnp.float32, "loss")
  assert_close(m["grad_norm"], m1["grad_norm"], jnp.float32, "grad_norm")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(p)):
    assert_close(b, a, jnp.float32, jax.tree_util.keystr(path))


MESHES = {"c8": C8, "d2c4": D2C4, "c4t2": C4T2}
# Every strategy on context 8; with a data axis the default (zigzag) and Ulysses (its own
# all-to-all path): ring and striped there add only the batch split, which zigzag covers
# (striped on d2c4 also runs in the ACP test below).
CASES = ([(s, "c8") for s in context_lib.STRATEGY_NAMES]
         + [("zigzag", "d2c4"), ("ulysses", "d2c4")]
         + [("zigzag", "c4t2"), ("ulysses", "c4t2")])


@pytest.mark.parametrize("strategy,mesh_name", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_fox_pro_step_equals_one_device(strategy, mesh_name):
  """KV-shift (halo across shards), QK-norm, GQA 8/2, packed documents, padding; on
  (context 4, tensor 2) each device attends with its own heads."""
  mesh = MESHES[mesh_name]
  want = _step(tuple(ONE.items()), "zigzag", "fox_pro_tiny", False)
  _assert_step_equal(_step(tuple(mesh.items()), strategy, "fox_pro_tiny", False), want)


@pytest.mark.parametrize("strategy,mesh,seq_chunk", [("ring", C8, None), ("ulysses", D2C4, 8)])
def test_transformer_pro_step_equals_one_device(strategy, mesh, seq_chunk):
  """RoPE at natural in-document positions, KV-shift, no forget gate; with the MLP and the
  LM head in 8-token chunks of each shard (``seq_chunk``) in one case."""
  want = _step(tuple(ONE.items()), "zigzag", "transformer_pro_tiny", False)
  got = _step(tuple(mesh.items()), strategy, "transformer_pro_tiny", False, seq_chunk)
  _assert_step_equal(got, want)


@pytest.mark.parametrize("strategy,mesh", [("zigzag", C8), ("striped", D2C4)])
def test_acp_step_equals_one_device(strategy, mesh):
  want = _step(tuple(ONE.items()), "zigzag", "fox_pro_tiny", True)
  got = _step(tuple(mesh.items()), strategy, "fox_pro_tiny", True)
  _assert_step_equal(got, want)
  kept, total = got[0]["kept_tiles"], got[0]["total_tiles"]
  assert 0 < kept < total  # ACP pruned tiles, and the step is still the one-device step
  if strategy == "zigzag":  # the same tiles: exactly the one-device op's pruning
    assert kept == want[0]["kept_tiles"]


@pytest.mark.parametrize("name,stripe", [("contiguous", 1), ("zigzag", 1), ("striped", 1),
                                         ("striped", 4)])
def test_previous_tokens_is_the_natural_shift(name, stripe):
  """The key/value shift's halo: every token's predecessor in natural order, 0 at the start."""
  P = 4
  mesh = sharding.make_mesh({"data": 2, "context": P})
  layout = layouts.Layout(name, 64, P, stripe)
  x = np.arange(2 * 64 * 3, dtype=np.float32).reshape(2, 64, 3) + 1
  spec = jax.sharding.PartitionSpec("data", "context")
  fn = jax.jit(jax.shard_map(lambda y: layouts.previous_tokens(y, layout, "context"),
                             mesh=mesh, in_specs=spec, out_specs=spec))
  got = np.asarray(layouts.unpermute(fn(layouts.permute(x, layout)), layout))
  want = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
  np.testing.assert_array_equal(got, want)


def test_eval_losses_are_in_natural_order():
  """Per-token losses under context parallelism come back in natural order."""
  params = _host_state("fox_pro_tiny")["params"]
  batch = _batch()
  out = []
  for mesh, devices in ((ONE, jax.devices()[:1]), (C8, jax.devices())):
    setup = train_lib.build(_config(mesh, "striped"), devices)
    p = jax.device_put(params, setup.state_shardings["params"])
    out.append(np.asarray(setup.eval_fn(p, Batch(*(jnp.asarray(x) for x in batch)))))
  assert_close(out[1], out[0], jnp.float32, "per-token losses")
  assert (out[0][2, -8:] == 0).all() and (out[0][2, :-8] > 0).all()


@pytest.mark.parametrize("mesh,overrides,seq_len,match", [
    (C8, {}, 120, r"config\.mesh\.context=8: seq_len 120 .*'zigzag'.*divisible by 2 x"),
    (C8, {"context_strategy": "striped", "context_stripe": 4}, 48,
     r"seq_len 48 .*'striped'.*divisible by the number of shards x stripe"),
    (C8, {"context_strategy": "ulysses", "num_heads": 4, "num_kv_heads": 4}, T,
     r"num_heads / num_kv_heads .*'ulysses'.*q heads \(4\)"),
])
def test_configs_that_cannot_be_laid_out_fail_at_start(mesh, overrides, seq_len, match):
  with pytest.raises(UsageError, match=match):
    train_lib.build(_config(mesh, seq_len=seq_len, **overrides), jax.devices())


def test_bad_strategy_names_the_field():
  with pytest.raises(UsageError, match=r"context_strategy must be one of"):
    train_lib.build(_config(C8, strategy="spiral"), jax.devices())
  with pytest.raises(UsageError, match=r"context_stripe applies to context_strategy 'striped'"):
    train_lib.build(_config(C8, context_stripe=2), jax.devices())


def test_checkpoint_from_context_mesh_resumes_anywhere(tmp_path):
  """Two steps on (context 4), saved; the third step resumed on one device and on
  (data 2, context 4) gives the same state as the straight run on (context 4)."""
  def config(mesh):
    c = _config(mesh, "zigzag", seq_len=64)
    c.data.global_batch = 2
    c.optim.total_tokens = 3 * 64 * 2
    c.run.update({"checkpoint_every": 2, "log_every": 1, "val_rows": 2,
                  "progress_bar": False})
    return c
  c4 = {"data": 1, "fsdp": 1, "context": 4, "tensor": 1}
  straight = train_lib.train(config(c4), str(tmp_path / "straight"), devices=jax.devices()[:4])
  first = train_lib.train(config(c4), str(tmp_path / "split"), max_steps=2,
                          devices=jax.devices()[:4])
  assert first.step == 2
  want = jax.device_get(straight.state)
  for name, mesh, devices in (("one", ONE, jax.devices()[:1]), ("d2c4", D2C4, jax.devices())):
    workdir = tmp_path / name
    shutil.copytree(tmp_path / "split", workdir)
    got = train_lib.train(config(mesh), str(workdir), devices=devices)
    assert got.step == 3
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                            jax.tree.leaves(jax.device_get(got.state))):
      assert_close(b, a, jnp.float32, f"{name} {jax.tree_util.keystr(path)}")
    assert_close(got.val_loss, straight.val_loss, jnp.float32, f"{name} val_loss")
  # fox-eval on one device of a run trained on (context 4): the saved mesh does not fit,
  # so it evaluates with FSDP over the device it has, to the run's own validation loss.
  result = evaluate.evaluate_run(str(tmp_path / "straight"), write=False,
                                 devices=jax.devices()[:1])
  assert result["step"] == 3
  assert_close(result["val_loss"], straight.val_loss, jnp.float32, "fox-eval val_loss")


def test_heads_split_over_tensor_only_where_they_divide():
  """Heads go over 'tensor' when q and k/v heads divide it, and for Ulysses only when each
  device's share still splits over 'context'; otherwise they are replicated (not an error)."""
  mesh = sharding.make_mesh(C4T2)
  q = lambda h: jax.ShapeDtypeStruct((1, T, h, 8), jnp.float32)
  for strategy, hq, hkv, want in [("zigzag", 8, 2, ("tensor",)), ("zigzag", 6, 3, None),
                                  ("ulysses", 8, 2, ("tensor",)), ("ulysses", 4, 4, None)]:
    cfg = get_preset("fox_pro_tiny", context_strategy=strategy)
    cp = context_lib.active(cfg, 1, T, mesh)
    assert cp._heads(q(hq), q(hkv)) == want, (strategy, hq, hkv)


def test_paper_context_configs():
  c = run_config.paper_context_config("fox_pro_760m", context=16)
  assert (c.data.seq_len, c.data.global_batch, c.mesh.context) == (16384, 32, 16)
  assert c.data.seq_len // (c.mesh.context * c.model.overrides.seq_chunk) == 4
  with pytest.raises(ValueError, match=r"preset must be a paper size .* got 'fox_pro_tiny'"):
    run_config.paper_context_config("fox_pro_tiny")

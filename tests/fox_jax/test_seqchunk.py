"""seq_chunk: the LM head with the cross-entropy, and the MLP, in sequence chunks.

The same losses and gradients as the whole sequence at once; no [B, T, V] (or [B, T, F])
array in the compiled gradient; chunks laid out per context shard; clear errors.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fox_jax import run_config, sharding
from fox_jax import train as train_lib
from fox_jax.config import get_preset
from fox_jax.data import Batch, PackedDataset, corpus_from_config
from fox_jax.errors import UsageError
from fox_jax.model import DecoderLM
from fox_jax.seqchunk import map_chunks
from tests.tolerances import assert_close

IMPL = "reference"  # compiles fastest; chunking does not touch attention


def _ids(B, T, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(B, T)), jnp.int32)


def _losses_and_grads(cfg, ids, segment_ids):
  graphdef, params, rest = nnx.split(DecoderLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

  def loss(params):
    per_token = nnx.merge(graphdef, params, rest).token_losses(
        ids[:, :-1], ids[:, 1:], segment_ids=segment_ids)
    return jnp.mean(per_token), per_token

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("name, overrides", [
    ("fox_pro_tiny", {}),
    ("fox_llama_tiny", {"tie_embeddings": True, "remat": True}),
])
def test_chunked_losses_and_grads_equal_unchunked(name, overrides):
  cfg = get_preset(name, attn_impl=IMPL, num_layers=1, **overrides)
  ids = _ids(2, 33, cfg.vocab_size)
  segment_ids = jnp.concatenate([jnp.zeros((2, 13), jnp.int32), jnp.ones((2, 19), jnp.int32)], 1)
  (loss0, per0), grads0 = _losses_and_grads(cfg, ids, segment_ids)
  (loss1, per1), grads1 = _losses_and_grads(cfg.replace(seq_chunk=8), ids, segment_ids)
  assert per1.shape == per0.shape == (2, 32) and per1.dtype == jnp.float32
  assert_close(per1, per0, "float32", "per-token losses")
  assert_close(loss1, loss0, "float32", "loss")
  paths = jax.tree_util.tree_flatten_with_path(grads0)[0]
  assert len(paths) == len(jax.tree.leaves(grads1))
  for (path, a), b in zip(paths, jax.tree.leaves(grads1)):
    assert_close(b, a, "float32", f"grad {jax.tree_util.keystr(path)}")


def _largest(hlo: str, dim: int) -> int:
  """Most elements of any array in ``hlo`` that has an axis of size ``dim``."""
  shapes = {tuple(int(d) for d in s.split(",")) for s in re.findall(r"\[([0-9]+(?:,[0-9]+)*)\]", hlo)}
  return max((math.prod(s) for s in shapes if dim in s), default=0)


def test_gradient_never_holds_whole_sequence_logits_or_mlp_hidden():
  """Every array of the compiled loss gradient with a vocabulary (or MLP) axis is one
  chunk's; without chunks the same check finds the whole [B, T, V] logits."""
  B, T, C, V, F = 2, 256, 32, 1031, 136  # V and F equal no other dim
  sizes = {}
  for chunk in (None, C):
    cfg = get_preset("fox_pro_tiny", attn_impl=IMPL, num_layers=1, vocab_size=V, mlp_hidden=F,
                     seq_chunk=chunk)
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))),
                                       nnx.Param, ...)

    def loss(params, ids, targets):
      return jnp.mean(nnx.merge(graphdef, params, rest).token_losses(ids, targets))

    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, ids, ids).compile()
    sizes[chunk] = (_largest(compiled.as_text(), V), _largest(compiled.as_text(), F))
  assert sizes[None] == (B * T * V, B * T * F)
  assert sizes[C][0] <= max(B * C * V, V * cfg.d_model), sizes  # the table itself is [V, d]
  assert sizes[C][1] <= max(B * C * F, F * cfg.d_model), sizes


def _mesh():
  return sharding.make_mesh({"data": 2, "context": 2, "tensor": 2})


def test_chunks_keep_context_shards_whole():
  """On a mesh with context 2 each scan step takes one chunk from every shard: the same
  values and gradients, and no collective moves tokens between shards."""
  cfg = get_preset("fox_pro_tiny", vocab_size=384)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split((model.final_norm, model.lm_head, model.layers[0]))
  mesh = _mesh()
  x = jax.random.normal(jax.random.key(1), (4, 64, cfg.d_model))
  targets = _ids(4, 64, cfg.vocab_size)
  batch_sh = sharding.batch_sharding(mesh)
  x = jax.device_put(x, sharding.batch_sharding(mesh, 3))
  targets = jax.device_put(targets, batch_sh)

  def losses(params, x, targets, chunk):
    norm, head, block = nnx.merge(graphdef, params)
    h = block.mlp_residual(x, seq_chunk=chunk)
    fn = lambda mods, h, t: train_lib.token_losses(mods[1](mods[0](h), "btd,dv->btv"), t)
    per = fn((norm, head), h, targets) if chunk is None else map_chunks(
        fn, (norm, head), (h, targets), chunk=chunk)
    return jnp.sum(per), per

  results = {}
  with sharding.activation_rules(mesh):
    for chunk in (None, 8):
      fn = jax.jit(jax.value_and_grad(losses, argnums=(0, 1), has_aux=True), static_argnums=3)
      results[chunk] = fn(params, x, targets, chunk)
    hlo = fn.lower(params, x, targets, 8).compile().as_text()
  (_, per0), grads0 = results[None]
  (_, per1), grads1 = results[8]
  assert per1.sharding.is_equivalent_to(batch_sh, 2)
  assert_close(per1, per0, "float32", "per-token losses")
  for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)):
    assert_close(b, a, "float32", "grads")
  # Tensor-parallel all-reduces only: a layout cutting across context shards would need
  # all-to-alls, collective-permutes or all-gathers of the tokens.
  moved = re.findall(r"(all-to-all|collective-permute|all-gather)\(", hlo)
  assert not moved, moved


def test_seq_chunk_errors_name_the_field():
  with pytest.raises(ValueError, match="seq_chunk must be a positive int"):
    get_preset("fox_pro_tiny", seq_chunk=0)
  cfg = get_preset("fox_pro_tiny", attn_impl=IMPL, num_layers=1, seq_chunk=8)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^seq_chunk: the sequence length 12 must be a multiple "
                                       r"of seq_chunk \(8\) x the mesh's 'context' size \(1\)$"):
    model.token_losses(_ids(1, 12, cfg.vocab_size), _ids(1, 12, cfg.vocab_size))
  # Per context shard: 16 tokens are one chunk of 8 on each of 2 shards, not 16 on each.
  # (xla: the context-parallel attention runs an implementation's chunk kernels.)
  model = DecoderLM(cfg.replace(seq_chunk=16, attn_impl="xla"), rngs=nnx.Rngs(0))
  with sharding.activation_rules(_mesh()):
    with pytest.raises(ValueError, match=r"seq_chunk \(16\) x the mesh's 'context' size \(2\)"):
      jax.eval_shape(lambda ids: model.token_losses(ids, ids), jax.ShapeDtypeStruct((4, 16), jnp.int32))
  # A run config is checked when built, before anything compiles.
  c = run_config.base_config()
  c.model.overrides.update({"num_layers": 1, "seq_chunk": 48})
  c.data.seq_len = 64
  with pytest.raises(UsageError, match=r"config\.model\.overrides\.seq_chunk \(48\)"):
    train_lib.build(c, jax.devices()[:1])
  assert "model.seq_chunk" in run_config.SAFE_ON_RESUME  # the same math: safe on resume


def test_eval_fn_with_seq_chunk_equals_without():
  """The run's evaluation (and loss) path uses the model's chunked losses."""
  out, params = [], None
  for chunk in (None, 16):
    c = run_config.base_config()
    c.model.overrides.update({"num_layers": 1, "dtype": "float32", "attn_impl": IMPL,
                              "seq_chunk": chunk})
    c.data.seq_len = 32
    c.mesh.update({"data": 1, "fsdp": 1})
    setup = train_lib.build(c, jax.devices()[:1])
    if params is None:  # the same parameters for both
      params = train_lib.init_state(setup, seed=0)["params"]
    rows = PackedDataset(corpus_from_config(c.data, "heldout"), 32, 0).rows(0, 2)
    out.append(np.asarray(setup.eval_fn(params, Batch(*(jnp.asarray(x) for x in rows)))))
  assert out[0].shape == (2, 32) and np.all(out[0] > 0)
  assert_close(out[1], out[0], "float32", "eval losses")

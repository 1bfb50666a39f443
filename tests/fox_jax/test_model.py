"""DecoderLM: presets build, run, train a step; options; packing; pruning stats; remat."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fox_jax import attention as attention_lib
from fox_jax.attention import decay_time_bias
from fox_jax.config import PRESETS, get_preset
from fox_jax.layers import Constant
from fox_jax.model import DecoderLM, count_params
from pallas_kernels import BlockSizes, Pruning
from tests.tolerances import SCALAR_F32_CANCELLING_RTOL, SCALAR_F32_RTOL, assert_close

IMPL = "xla"
TINY = ("fox_pro_tiny", "fox_llama_tiny", "transformer_pro_tiny", "transformer_llama_tiny")
PARAM_AXES = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm"}


def _ids(B, T, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(B, T)), jnp.int32)


def _loss_fn(graphdef, rest, ids):
  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(ids[:, :-1])  # [B, T - 1, V] float32
    assert logits.dtype == jnp.float32 and logits.shape[:2] == ids[:, 1:].shape
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))
  return loss


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_forward_and_train_step(name):
  cfg = get_preset(name, attn_impl=IMPL)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  ids = _ids(2, 17, cfg.vocab_size)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  loss = _loss_fn(graphdef, rest, ids)

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return value, grads, optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  loss0, grads, params, opt_state = step(params, opt_state)
  loss1, _, _, _ = step(params, opt_state)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.sum(g * g)) for g in leaves) > 0
  # Near-uniform predictions at init (std 0.02): loss close to log(vocab).
  assert abs(float(loss0) - np.log(cfg.vocab_size)) < 0.1
  assert float(loss1) < float(loss0)


# Non-embedding parameters of the 760M models in the FoX paper (the untied lm_head counts).
PAPER_760M = {"fox_pro_760m": 759e6, "transformer_pro_760m": 757e6,
              "fox_llama_760m": 757e6, "transformer_llama_760m": 756e6}


@pytest.mark.parametrize("name", sorted(PAPER_760M))
def test_760m_non_embedding_params_match_paper(name):
  abstract = nnx.eval_shape(lambda: DecoderLM(PRESETS[name], rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
  count = count_params(state, exclude_embedding=True)
  assert count_params(state) - count == PRESETS[name].vocab_size * PRESETS[name].d_model
  assert abs(count - PAPER_760M[name]) / PAPER_760M[name] < 0.005, count


def test_mlp_width_rule():
  assert PRESETS["fox_llama_760m"].mlp_width == 4096  # 256 * ceil(2/3 * 4 * 1536 / 256)
  assert PRESETS["fox_pro_760m"].mlp_width == 3584    # ratio 3.5
  assert PRESETS["fox_pro_125m"].mlp_width == 1792    # 2/3 * 3.5 * 768 = 1792
  assert PRESETS["fox_llama_360m"].mlp_width == 2816  # ceil(2730.7 / 256) * 256


def test_every_param_has_logical_axes():
  cfg = get_preset("fox_pro_tiny", num_kv_heads=2, qk_norm_shared_across_heads=True)
  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
  for path, spec in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    assert len(spec) >= 1 and set(spec) <= PARAM_AXES, (jax.tree_util.keystr(path), spec)


@pytest.mark.parametrize("field, overrides", [
    ("head_dim", dict(d_model=64, num_heads=5)),
    ("head_dim", dict(d_model=64, num_heads=4, head_dim=32)),
    ("num_kv_heads", dict(num_heads=4, num_kv_heads=3)),
    ("forget_gate", dict(forget_gate="sometimes")),
    ("attn_impl", dict(attn_impl="cuda")),
    ("dtype", dict(dtype="int8")),
    ("decay_time_min", dict(forget_gate="fixed")),
    ("vocab_size", dict(vocab_size=0)),
    ("num_layers", dict(num_layers=-1)),
    ("output_gate_act", dict(output_gate=True, output_norm=True, output_gate_act="silu")),
    ("pruning", dict(pruning="yes")),
    ("plain_attn_impl", dict(forget_gate="none", plain_attn_impl="flash")),
    ("plain_attn_impl", dict(plain_attn_impl="xla")),  # a FoX model has a gate
])
def test_bad_config_names_the_field(field, overrides):
  with pytest.raises(ValueError, match=f"^{field}") as e:
    get_preset("fox_llama_tiny", **overrides)
  assert "\n" not in str(e.value)


def test_config_dict_round_trip():
  cfg = get_preset("fox_pro_tiny", pruning=dict(log_tolerance=-8.0), block_sizes=dict(block_q=32))
  assert isinstance(cfg.pruning, Pruning) and isinstance(cfg.block_sizes, BlockSizes)
  again = type(cfg).from_dict(cfg.to_dict())
  assert again == cfg and hash(again) == hash(cfg)


@pytest.mark.parametrize("gate, kv_heads", [("full", 2), ("bias_only", 4), ("fixed", 1),
                                            ("none", 2)])
def test_forget_gate_types_and_gqa(gate, kv_heads):
  times = dict(decay_time_min=2.0, decay_time_max=200.0) if gate == "fixed" else {}
  cfg = get_preset("fox_llama_tiny", attn_impl=IMPL, forget_gate=gate, num_kv_heads=kv_heads,
                   **times)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  attn = model.layers[0].attn
  assert attn.k_proj.kernel.shape == (cfg.d_model, kv_heads, cfg.head_dim)
  x = jax.random.normal(jax.random.key(0), (2, 7, cfg.d_model))
  log_f = np.asarray(attn.log_forget_gate(x))
  assert log_f.shape == (2, 7, cfg.num_heads) and log_f.dtype == np.float32
  if gate == "full":
    assert isinstance(attn.fgate_proj.bias, nnx.Param)
    np.testing.assert_array_equal(attn.fgate_proj.bias[...], 0.0)  # f ~ 0.5 at init
  elif gate == "bias_only":
    assert isinstance(attn.fgate_bias, nnx.Param)
    np.testing.assert_allclose(log_f, np.log(0.5), rtol=SCALAR_F32_RTOL)
  elif gate == "fixed":
    # A constant, not a trainable parameter; decay times -1/log f log-spaced in [2, 200].
    assert isinstance(attn.fgate_bias, Constant) and not isinstance(attn.fgate_bias, nnx.Param)
    np.testing.assert_allclose(-1.0 / log_f[0, 0], np.geomspace(2.0, 200.0, cfg.num_heads),
                               rtol=SCALAR_F32_CANCELLING_RTOL)
    np.testing.assert_allclose(attn.fgate_bias[...], decay_time_bias(cfg.num_heads, 2.0, 200.0))
  else:
    assert attn.fgate_proj is None and attn.fgate_bias is None
    np.testing.assert_array_equal(log_f, 0.0)
  logits = nnx.jit(lambda m, ids: m(ids))(model, _ids(2, 9, cfg.vocab_size))
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", ["fox_pro_tiny", "transformer_pro_tiny"])
def test_packed_documents_equal_separate_documents(name):
  """Segments isolate attention, KV-shift and RoPE positions: packing changes nothing."""
  cfg = get_preset(name, attn_impl=IMPL, num_kv_heads=2)
  model = DecoderLM(cfg, rngs=nnx.Rngs(3))
  a, b = _ids(2, 7, cfg.vocab_size, seed=1), _ids(2, 10, cfg.vocab_size, seed=2)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.concatenate([jnp.zeros_like(a), jnp.ones_like(b)], axis=1)
  fwd = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg))
  got = np.asarray(fwd(model, packed, seg))
  want = np.concatenate([np.asarray(fwd(model, a, jnp.zeros_like(a))),
                         np.asarray(fwd(model, b, jnp.zeros_like(b)))], axis=1)
  assert_close(got, want, "float32", name)


def test_pruning_sows_kept_and_total_tiles():
  cfg = get_preset("fox_llama_tiny", attn_impl=IMPL, pruning=Pruning(log_tolerance=-10.0),
                   block_sizes=BlockSizes(block_q=16, block_k=16))
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  # Strong forgetting (f ~ 0.01) makes most off-diagonal tiles prunable.
  for block in model.layers:
    block.attn.fgate_proj.bias[...] = jnp.full((cfg.num_heads,), -4.6)

  @nnx.jit
  def run(m, ids):
    return nnx.capture(m, nnx.Intermediate)(ids)

  logits, inter = run(model, _ids(2, 96, cfg.vocab_size))
  tiles = [v for _, v in jax.tree_util.tree_leaves_with_path(inter)]
  assert len(tiles) == 2 * cfg.num_layers  # (kept, total) per layer
  for kept, total in zip(tiles[0::2], tiles[1::2]):
    # 6 q blocks x up to 6 kv blocks, causal: 21 tiles per (batch, head).
    assert int(total) == 21 * 2 * cfg.num_heads
    assert 0 < int(kept) < int(total)
  unpruned = DecoderLM(cfg.replace(pruning=None), rngs=nnx.Rngs(0))
  nnx.update(unpruned, nnx.state(model, nnx.Param))
  want = nnx.jit(lambda m, ids: m(ids))(unpruned, _ids(2, 96, cfg.vocab_size))
  assert_close(logits, want, "float32", "pruned vs unpruned logits")


def test_remat_gives_the_same_loss_and_grads():
  cfg = get_preset("fox_pro_tiny", attn_impl=IMPL, num_layers=1)
  ids = _ids(2, 12, cfg.vocab_size)
  results = []
  for remat in (False, True):
    model = DecoderLM(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    results.append(jax.jit(jax.value_and_grad(_loss_fn(graphdef, rest, ids)))(params))
  (l0, g0), (l1, g1) = results
  assert float(l0) == pytest.approx(float(l1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert_close(b, a, "float32", "remat grads")


def test_transformer_plain_kernel_matches_forgetting_kernel_with_zero_gate(monkeypatch):
  """forget_gate 'none' runs plain causal attention by default; the forgetting op with
  log f = 0 (plain_attn_impl="forgetting", the path before) gives the same loss and grads.
  GQA, packed documents and trailing padding (segment 0), as in training. Both in one jit
  (one compilation)."""
  calls, real = [], attention_lib.plain_attention

  def spy(*args, **kwargs):
    calls.append(kwargs["impl"])
    return real(*args, **kwargs)

  monkeypatch.setattr(attention_lib, "plain_attention", spy)
  base = get_preset("transformer_llama_tiny", attn_impl=IMPL, num_kv_heads=2, num_layers=1)
  assert base.plain_attn_impl == "auto"
  ids = _ids(2, 25, base.vocab_size, seed=4)
  seg = np.ones((2, 24), np.int32)
  seg[0, 9:], seg[0, 20:], seg[1, 15:] = 2, 0, 3
  seg = jnp.asarray(seg)
  splits = [nnx.split(DecoderLM(base.replace(plain_attn_impl=p), rngs=nnx.Rngs(0)), nnx.Param,
                      ...) for p in ("auto", "forgetting")]

  def value_and_grad(graphdef, params, rest):
    def loss(params):
      logits = nnx.merge(graphdef, params, rest)(ids[:, :-1], segment_ids=seg)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
      return jnp.sum(ce * (seg > 0)) / jnp.sum(seg > 0)
    return jax.value_and_grad(loss)(params)

  (l_plain, g_plain), (l_gate, g_gate) = jax.jit(
      lambda p: [value_and_grad(g, pi, r) for (g, _, r), pi in zip(splits, p)])(
          [params for _, params, _ in splits])
  assert calls == ["auto"] * base.num_layers  # traced once, by the plain model only
  assert_close(l_plain, l_gate, "float32", "loss")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_gate), jax.tree.leaves(g_plain)):
    assert_close(b, a, "float32", jax.tree_util.keystr(path))

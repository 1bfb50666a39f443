"""Sequence-sharded decoding (Tree Attention) on 8 simulated CPU devices equals one device's:
the logits of a prefill into an empty cache (the sequence-parallel op), of a prefill into a
non-empty one and of every step (tree attention), on a (context 8) and a (data 2, context 4)
mesh, for FoX Pro tiny (KV-shift, QK-norm, GQA 4:2) with ACP pruning whole shards (strong
gates in layer 1) and zero forget gates (layer 0), where both paths give the parallel op's
logits; greedy ``generate``; the cache stays sharded over "context"; bad meshes and lengths
are one-line ValueErrors.

Compilation dominates the time: the tests share one model and one compiled trajectory per
mesh."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fox_jax import decode
from fox_jax.config import get_preset
from fox_jax.model import DecoderLM
from fox_jax.sharding import make_mesh
from tests.tolerances import assert_close

S, B, P1, P2, T = 64, 2, 7, 5, 60  # cache slots; prefill 7 into the empty cache, 5 more, steps
LOG_EPS = -10.0


@functools.cache
def _mesh(name):
  return {"ctx8": make_mesh({"context": 8}),
          "data2_ctx4": make_mesh({"data": 2, "context": 4})}.get(name)


def _ids(T, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(B, T)), jnp.int32)


def _randomise_scales(model, seed):
  """Norm scales in +-[0.5, 1.5], so that QK-norm and the output norm matter."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and path[-1] == "scale":
      var[...] = jnp.asarray(rng.uniform(0.5, 1.5, var.shape) * rng.choice([-1.0, 1.0], var.shape),
                             var.dtype)


def _trajectory(model, ids, cache):
  """Prefill P1 tokens, prefill P2 more, then one step per remaining token: logits [B, T, V]."""
  first, cache = decode.prefill(model, ids[:, :P1], cache)
  second, cache = decode.prefill(model, ids[:, P1:P1 + P2], cache)

  def body(cache, tok):
    logits, cache = decode.decode_step(model, tok, cache)
    return cache, logits

  cache, steps = jax.lax.scan(body, cache, ids[:, P1 + P2:].T)
  return jnp.concatenate([first, second, steps.transpose(1, 0, 2)], axis=1), cache


# jax.jit on (graphdef, state), not nnx.jit: nnx.jit would write the outputs' copies of the
# parameters back into the model, leaving them on one mesh when the next test uses another.
@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, ids, cache):
  return _trajectory(nnx.merge(graphdef, state), ids, cache)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


def _fox_pro(num_layers=2, **overrides):
  """FoX Pro tiny with GQA 4:2, float32, norm scales randomised."""
  cfg = get_preset("fox_pro_tiny", attn_impl="xla", dtype="float32", num_kv_heads=2,
                   num_layers=num_layers, **overrides)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  _randomise_scales(model, seed=1)
  return model


@functools.cache
def _model():
  """ACP on; layer 0: log f = -inf at every token of head 0, ~-1e30 or 0 per token in head
  1, default gates in heads 2, 3; layer 1: strong gates (log f ~ -3 per token)."""
  model = _fox_pro(pruning=dict(log_tolerance=LOG_EPS))
  proj = model.layers[0].attn.fgate_proj
  proj.bias[...] = proj.bias[...].at[0].set(-jnp.inf)
  proj.kernel[...] = proj.kernel[...].at[:, 1].multiply(1e32)
  model.layers[1].attn.fgate_proj.bias[...] = jnp.full((4,), -3.0)
  return model, _ids(T, model.cfg.vocab_size)


@functools.cache
def _decode(mesh_name):
  model, ids = _model()
  cache = decode.init_cache(model.cfg, B, S, _mesh(mesh_name))
  logits, cache = _run(*nnx.split(model), ids, cache)
  return np.asarray(logits, np.float64), cache


@pytest.mark.parametrize("mesh_name", ["ctx8", "data2_ctx4"])
def test_sharded_equals_one_device(mesh_name):
  got, cache = _decode(mesh_name)
  assert int(cache.length) == T
  assert_close(got, _decode(None)[0], "float32", mesh_name)
  shards = _mesh(mesh_name).shape["context"]
  batch = ("data",) if mesh_name == "data2_ctx4" else None
  for lc in cache.layers:
    for name in ("k", "v", "c_hi", "c_lo"):
      x = getattr(lc, name)
      assert P(*x.sharding.spec[:2]) == P(batch, "context"), name
      assert x.addressable_shards[0].data.shape[:2] == (B // (2 if batch else 1), S // shards)
    assert lc.log_f is None


def test_some_shards_fully_pruned():
  """At the last step of layer 1, whole shards of 8 hold only keys that ACP drops for
  certain: D_ts < log eps - 2 U - log S for every key, with U the QK-norm bound (>= the
  step's bound)."""
  model, _ = _model()
  lc = _decode(None)[1].layers[1]
  attn = model.layers[1].attn
  u = (model.cfg.head_dim ** 0.5 * float(jnp.max(jnp.abs(attn.q_norm.scale[...])))
       * float(jnp.max(jnp.abs(attn.k_norm.scale[...]))))
  decay = (np.asarray(lc.c_run_hi, np.float64)[:, None] - np.asarray(lc.c_hi[:, :T])) + (
      np.asarray(lc.c_run_lo, np.float64)[:, None] - np.asarray(lc.c_lo[:, :T]))  # [B, T, Hq]
  L = S // 8
  top = [decay[:, d * L:(d + 1) * L].max() for d in range(8) if d * L < T]
  pruned = [d for d, m in enumerate(top) if m < LOG_EPS - 2 * u - math.log(S)]
  assert len(pruned) >= 4, (top, u)


# The model's forward sows ACP tile counts outside nnx.capture (attention.py), which Flax
# deprecates; nothing here reads them.
@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside")
def test_zero_gates_match_the_parallel_op():
  """Cached decoding at zero gates gives the full forward's logits (the parallel op, which
  floors such gates), not NaN; the sharded path equals it (test_sharded_equals_one_device)."""
  model, ids = _model()
  attn, x = model.layers[0].attn, model.layers[0].attn_norm(model.embed(ids))
  lf = np.asarray(attn.log_forget_gate(x))
  assert np.all(np.isneginf(lf[..., 0])) and np.any(lf[..., 1] < -1e20) and np.any(lf[..., 1] == 0)
  want = np.asarray(_forward(*nnx.split(model), ids), np.float64)
  assert_close(_decode(None)[0], want, "float32", "one device")


def test_generate_greedy_sharded():
  """Each greedy token of the sharded generate is the full forward's argmax (as the
  one-device generate's are, test_decode.py); no pruning here."""
  model = _fox_pro(num_layers=1)
  prompt = _ids(9, model.cfg.vocab_size, seed=2)  # 9 + 6 = 15 slots, padded up to 16
  got = decode.generate(model, prompt, 6, mesh=_mesh("ctx8"))
  np.testing.assert_array_equal(got[:, :9], prompt)
  logits = np.asarray(_forward(*nnx.split(model), got[:, :-1]))
  np.testing.assert_array_equal(got[:, 9:], logits[:, 8:].argmax(-1))


def test_bad_mesh_and_length():
  cfg = get_preset("fox_pro_tiny")
  with pytest.raises(ValueError, match=r"^max_len 60 must be divisible"):
    decode.init_cache(cfg, B, 60, _mesh("ctx8"))
  no_context = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  with pytest.raises(ValueError, match=r"^mesh has no 'context' axis"):
    decode.init_cache(cfg, B, 64, no_context)
  with pytest.raises(ValueError, match=r"^mesh must be a jax.sharding.Mesh"):
    decode.init_cache(cfg, B, 64, "context")
  with pytest.raises(ValueError, match=r"^mesh has no 'context' axis"):
    decode.generate(DecoderLM(cfg.replace(num_layers=1), rngs=nnx.Rngs(0)),
                    jnp.zeros((B, 3), jnp.int32), 2, mesh=no_context)
  with pytest.raises(ValueError, match=r"^the prompt \(70 tokens\) is longer"):
    decode.prefill(DecoderLM(cfg.replace(num_layers=1), rngs=nnx.Rngs(0)),
                   jnp.zeros((B, 70), jnp.int32), decode.init_cache(cfg, B, 64, _mesh("ctx8")))
  with pytest.raises(ValueError, match=r"^decode_step: prefill a sharded cache"):
    decode.decode_step(DecoderLM(cfg.replace(num_layers=1), rngs=nnx.Rngs(0)),
                       jnp.zeros((B,), jnp.int32), decode.init_cache(cfg, B, 64, _mesh("ctx8")))

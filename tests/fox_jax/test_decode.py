"""Cached decoding: prefill + step-by-step logits equal the full forward; generate; TwoSum c."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fox_jax import decode
from fox_jax.config import get_preset
from fox_jax.model import DecoderLM
from pallas_kernels.forgetting_attention.common import add_pairs
from tests.tolerances import SCALAR_F32_RTOL, assert_close

IMPL = "xla"


def _ids(B, T, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(B, T)), jnp.int32)


def _randomise_gains(model, seed):
  """Norm scales and gate biases away from their init values, so that each one matters."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    if path[-1] == "scale":  # magnitudes in [0.5, 1.5] with random signs
      value = rng.uniform(0.5, 1.5, var.shape) * rng.choice([-1.0, 1.0], var.shape)
    elif path[-1] in ("bias", "fgate_bias"):  # forget gates from ~0.2 to ~1
      value = rng.normal(1.0, 2.0, var.shape)
    else:
      continue
    var[...] = jnp.asarray(value, var.dtype)


@nnx.jit
def _forward(model, ids):
  return model(ids)


_prefill = nnx.jit(decode.prefill)
_step = nnx.jit(decode.decode_step)


# One case per preset family, with GQA, shared QK-norm scales, tied embeddings and a fixed
# gate spread over the cases. Prefill in two chunks (an empty cache, then a non-empty one),
# then single steps.
@pytest.mark.parametrize("name, overrides", [
    ("fox_pro_tiny", dict(num_kv_heads=2, qk_norm_shared_across_heads=True)),
    ("fox_llama_tiny", dict(forget_gate="fixed", decay_time_min=1.0, decay_time_max=50.0)),
    ("transformer_pro_tiny", dict(tie_embeddings=True)),
    ("transformer_llama_tiny", dict(num_kv_heads=1)),
], ids=["fox_pro-HKV2-shared_qk_norm", "fox_llama-fixed_gate", "transformer_pro-tied",
        "transformer_llama-HKV1"])
def test_cached_decoding_matches_full_forward(name, overrides):
  cfg = get_preset(name, attn_impl=IMPL, dtype="float32", **overrides)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  _randomise_gains(model, seed=1)
  B, T, P1, P2 = 2, 13, 4, 4
  ids = _ids(B, T, cfg.vocab_size)
  want = np.asarray(_forward(model, ids))

  cache = decode.init_cache(cfg, B, T + 2)
  first, cache = _prefill(model, ids[:, :P1], cache)
  second, cache = _prefill(model, ids[:, P1:P1 + P2], cache)
  got = [first, second]
  for t in range(P1 + P2, T):
    logits, cache = _step(model, ids[:, t], cache)
    got.append(logits[:, None])
  assert int(cache.length) == T
  assert_close(np.concatenate(got, axis=1), want, "float32", name)


def test_generate_greedy_and_top_k_sampling():
  cfg = get_preset("fox_pro_tiny", attn_impl=IMPL, dtype="float32")
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  _randomise_gains(model, seed=2)
  prompt = _ids(2, 6, cfg.vocab_size)
  greedy = decode.generate(model, prompt, 5)
  assert greedy.shape == (2, 11)
  np.testing.assert_array_equal(greedy[:, :6], prompt)
  # Each greedy token is the argmax of the full forward on everything before it.
  logits = np.asarray(_forward(model, greedy[:, :-1]))
  np.testing.assert_array_equal(greedy[:, 6:], logits[:, 5:].argmax(-1))

  sampled = decode.generate(model, prompt, 5, temperature=1.5, top_k=3, rng=jax.random.key(5))
  again = decode.generate(model, prompt, 5, temperature=1.5, top_k=3, rng=jax.random.key(5))
  np.testing.assert_array_equal(sampled, again)  # seeded
  # Every sampled token is among the 3 most likely under the full forward.
  logits = np.asarray(_forward(model, sampled[:, :-1]))[:, 5:]
  top3 = np.argsort(-logits, axis=-1)[..., :3]
  assert np.all(np.any(top3 == np.asarray(sampled[:, 6:])[..., None], axis=-1))
  with pytest.raises(ValueError, match="rng"):
    decode.generate(model, prompt, 2, temperature=1.0)


def test_running_c_pairs_track_float64_cumsum():
  """10k steps of strong forgetting: the TwoSum-updated pair stays at ~1e-12 relative."""
  rng = np.random.default_rng(0)
  log_f = -rng.uniform(1.0, 9.0, size=(10_000, 3)).astype(np.float32)

  def body(c, lf):
    c = add_pairs(c[0], c[1], lf, jnp.zeros_like(lf))
    return c, c

  zeros = jnp.zeros((3,), jnp.float32)
  _, (hi, lo) = jax.lax.scan(body, (zeros, zeros), jnp.asarray(log_f))
  want = np.cumsum(log_f.astype(np.float64), axis=0)
  got = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
  assert np.max(np.abs(got - want) / np.abs(want)) < 1e-12
  # The difference of nearby positions keeps full float32 precision (the plain float32
  # cumsum at |c| ~ 5e4 would have an absolute error ~ 4e-3 in D).
  d = (np.asarray(hi[-1], np.float64) - np.asarray(hi[-2])) + (np.asarray(lo[-1], np.float64) - np.asarray(lo[-2]))
  np.testing.assert_allclose(d, log_f[-1], rtol=SCALAR_F32_RTOL)

"""Every option of the authors' config, imported and checked against a float64 oracle.

The three fixtures cover three option sets. The others (bias-only and fixed gates, QK-norm
per head, silu output gate, GLU MLP, explicit MLP width, key shift alone, tied embeddings,
RoPE base) are built here by editing a fixture, and checked against ``authors_forward``: a
float64 numpy transcription of the authors' PyTorch forward pass (their modeling file:
ShiftLinear, GroupRMSNorm, ForgettingAttentionLayer, ForgettingTransformerMLP and block),
independent of fox_jax. The oracle itself is first checked on the three fixtures against
the logits the authors' own code computed.
"""

import json
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from fox_jax import convert
from tests.tolerances import IMPORTED_LOGITS_F32, error_ratios

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "authors_checkpoints")
QK_NORM_EPS = 1e-5  # the authors' QK-norm keeps fla's RMSNorm default


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def authors_forward(hf, P, ids):
  """The authors' ForgettingTransformerForCausalLM forward in float64: ids [B, T] -> [B, T, V]."""
  P = {k: np.asarray(v, np.float64) for k, v in P.items()}
  B, T = ids.shape
  H, d, eps = hf["num_heads"], hf["hidden_size"], hf["norm_eps"]
  D = d // H
  x = P["model.embeddings.weight"][ids]  # [B, T, d]
  for i in range(hf["num_hidden_layers"]):
    p = lambda n: P[f"model.layers.{i}.{n}"]
    h = _rms(x, p("attn_norm.weight"), eps)
    q = (h @ p("attn.q_proj.weight").T).reshape(B, T, H, D)

    def key_or_value(name):
      if not hf.get(f"use_{name}_shift"):
        return (h @ p(f"attn.{name}_proj.weight").T).reshape(B, T, H, D)
      out = (h @ p(f"attn.{name}_proj.linear.weight").T).reshape(B, T, H, D)
      alpha = _sigmoid(h @ p(f"attn.{name}_proj.shift_proj.weight").T)[..., None]  # [B, T, H, 1]
      prev = np.concatenate([np.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
      return alpha * prev + (1.0 - alpha) * out

    k, v = key_or_value("k"), key_or_value("v")
    if hf.get("qk_norm"):
      q = _rms(q, p("attn.q_norm.weight").reshape(-1, D), QK_NORM_EPS)  # [D] or [H, D]
      k = _rms(k, p("attn.k_norm.weight").reshape(-1, D), QK_NORM_EPS)
    if hf.get("use_rope"):
      inv_freq = 1.0 / hf["rope_base"] ** (np.arange(0, D, 2) / D)
      angle = np.arange(T)[:, None] * inv_freq  # [T, D/2]
      cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
      rotate = lambda z: np.concatenate([z[..., :D // 2] * cos - z[..., D // 2:] * sin,
                                         z[..., D // 2:] * cos + z[..., :D // 2] * sin], -1)
      q, k = rotate(q), rotate(k)
    gate = hf.get("fgate_type", "full")
    if gate == "full":
      logit = h @ p("attn.fgate_proj.weight").T + p("attn.fgate_proj.bias")
    elif gate in ("bias_only", "fixed"):
      logit = np.broadcast_to(p("attn.fgate_bias"), (B, T, H))
    else:
      logit = np.full((B, T, H), np.inf)
    log_f = -np.logaddexp(0.0, -logit)  # log sigmoid, [B, T, H]
    c = np.cumsum(log_f, axis=1).transpose(0, 2, 1)  # [B, H, T]
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D) + c[..., :, None] - c[..., None, :]
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("bhts,bshd->bthd", w / w.sum(-1, keepdims=True), v)
    if hf.get("use_output_norm"):
      o = _rms(o, p("attn.output_norm.weight").reshape(H, D), eps)
    o = o.reshape(B, T, d)
    if hf.get("use_output_gate"):
      g = h @ p("attn.ogate_proj.weight").T
      o = o * (_sigmoid(g) if hf.get("ogate_act", "sigmoid") == "sigmoid" else g * _sigmoid(g))
    x = x + o @ p("attn.o_proj.weight").T
    h = _rms(x, p("mlp_norm.weight"), eps)
    gate_in, up = np.split(h @ p("mlp.gate_proj.weight").T, 2, axis=-1)
    swish = hf.get("hidden_act", "swish") == "swish"
    act = gate_in * _sigmoid(gate_in) if swish else _sigmoid(gate_in)
    x = x + (act * up) @ p("mlp.down_proj.weight").T
  x = _rms(x, P["model.norm.weight"], eps)
  head = P["model.embeddings.weight"] if hf.get("tie_word_embeddings") else P["lm_head.weight"]
  return x @ head.T


def _fixture(name):
  with open(os.path.join(DATA, name, "config.json")) as f:
    hf = json.load(f)
  return hf, dict(load_file(os.path.join(DATA, name, "model.safetensors")))


def assert_logits_match(actual, expected, name):
  rms, mx = error_ratios(actual, expected)
  rms_tol, max_tol = IMPORTED_LOGITS_F32
  assert rms <= rms_tol and mx <= max_tol, (
      f"{name}: rms error ratio {rms:.3g} (tol {rms_tol:g}), max {mx:.3g} (tol {max_tol:g})")


@pytest.mark.parametrize("name", ["fox_pro", "fox_llama", "transformer_pro"])
def test_oracle_reproduces_fixtures(name):
  hf, tensors = _fixture(name)
  expected = load_file(os.path.join(DATA, name, "expected.safetensors"))
  assert_logits_match(authors_forward(hf, tensors, expected["input_ids"]), expected["logits"],
                      f"oracle on {name}")


def _layers(hf):
  return [f"model.layers.{i}.attn." for i in range(hf["num_hidden_layers"])]


def _bias_only(hf, P, rng):
  hf.update(fgate_type="bias_only")
  for a in _layers(hf):
    del P[a + "fgate_proj.weight"], P[a + "fgate_proj.bias"]
    P[a + "fgate_bias"] = rng.uniform(-1.0, 4.0, size=4).astype(np.float32)


def _fixed(hf, P, rng):
  hf.update(fgate_type="fixed", fgate_bias_init=True, decay_time_min=2.0, decay_time_max=64.0)
  times = np.exp(np.linspace(math.log(2.0), math.log(64.0), 4))
  for a in _layers(hf):
    del P[a + "fgate_proj.weight"], P[a + "fgate_proj.bias"]
    P[a + "fgate_bias"] = (-np.log(np.expm1(1.0 / times))).astype(np.float32)


def _qk_norm_per_head(hf, P, rng):
  hf.update(qk_norm_share_param_across_head=False)
  for a in _layers(hf):
    for n in ("q_norm", "k_norm"):
      P[a + n + ".weight"] = rng.uniform(0.5, 1.5, size=64).astype(np.float32)


def _silu_gate_no_output_norm(hf, P, rng):
  hf.update(ogate_act="silu", use_output_norm=False)
  for a in _layers(hf):
    del P[a + "output_norm.weight"]


def _glu_mlp_explicit_width(hf, P, rng):
  hf.update(hidden_act="sigmoid", intermediate_size=128)
  for i in range(hf["num_hidden_layers"]):
    m = f"model.layers.{i}.mlp."
    P[m + "gate_proj.weight"] = rng.normal(0, 0.2, size=(256, 64)).astype(np.float32)
    P[m + "down_proj.weight"] = rng.normal(0, 0.2, size=(64, 128)).astype(np.float32)


def _key_shift_only(hf, P, rng):
  hf.update(use_v_shift=False)
  for a in _layers(hf):
    P[a + "v_proj.weight"] = P.pop(a + "v_proj.linear.weight")
    del P[a + "v_proj.shift_proj.weight"]


def _tied_rope_base(hf, P, rng):
  hf.update(tie_word_embeddings=True, rope_base=10000.0)
  del P["lm_head.weight"]


# variant -> (fixture it edits, edits, ModelConfig fields they must produce). Each variant
# combines a few independent options to keep the number of compiled models small.
VARIANTS = {
    "gate-bias_only-qknorm-per-head-k-shift-only": (
        "fox_pro", (_bias_only, _qk_norm_per_head, _key_shift_only),
        dict(forget_gate="bias_only", qk_norm_shared_across_heads=False, k_shift=True,
             v_shift=False)),
    "gate-fixed-ogate-silu-no-outnorm": (
        "fox_pro", (_fixed, _silu_gate_no_output_norm),
        dict(forget_gate="fixed", decay_time_min=2.0, decay_time_max=64.0,
             output_gate_act="silu", output_norm=False)),
    "mlp-glu-F128-tied-rope10k": (
        "transformer_pro", (_glu_mlp_explicit_width, _tied_rope_base),
        dict(mlp_act="sigmoid", mlp_width=128, tie_embeddings=True, rope_base=10000.0)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_option_variant(variant, tmp_path):
  fixture, edits, fields = VARIANTS[variant]
  hf, tensors = _fixture(fixture)
  rng = np.random.default_rng(len(variant))
  for edit in edits:
    edit(hf, tensors, rng)
  d = tmp_path / variant
  shutil.copytree(os.path.join(DATA, fixture), d)
  with open(d / "config.json", "w") as f:
    json.dump(hf, f)
  save_file(tensors, str(d / "model.safetensors"))
  cfg, model = convert.load_authors_checkpoint(str(d), attn_impl="reference")
  for field, value in fields.items():
    assert getattr(cfg, field) == value, field
  ids = np.random.default_rng(0).integers(0, hf["vocab_size"], size=(2, 17)).astype(np.int32)
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
  assert_logits_match(logits, authors_forward(hf, tensors, ids), variant)


def test_pruning_tolerance_maps_to_acp():
  hf, _ = _fixture("fox_pro")
  cfg = convert.authors_config(dict(hf, log_pruning_tolerance=-10.0))
  assert cfg.pruning.log_tolerance == -10.0 and cfg.pruning.qk_bound == "auto"
  assert convert.authors_config(hf).pruning is None

"""Import of the authors' Hugging Face checkpoints (tests/data/authors_checkpoints).

Each fixture holds a tiny random checkpoint and the logits the authors' own PyTorch model
computes for given ids (float32, exact CPU kernels): the import must reproduce them within
float32 rounding. Bad checkpoints must fail with a ValueError that names the culprit.
"""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from fox_jax import cli, convert
from tests.tolerances import IMPORTED_LOGITS_F32, error_ratios

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "authors_checkpoints")
FIXTURES = ("fox_pro", "fox_llama", "transformer_pro")

# What each fixture's config must map to (the fixtures' README describes them).
EXPECTED_FIELDS = {
    "fox_pro": dict(forget_gate="full", qk_norm=True, qk_norm_shared_across_heads=True,
                    output_gate=True, output_norm=True, k_shift=True, v_shift=True, rope=False,
                    mlp_width=256),
    "fox_llama": dict(forget_gate="full", qk_norm=False, output_gate=False, output_norm=False,
                      k_shift=False, v_shift=False, rope=False, mlp_width=256),
    "transformer_pro": dict(forget_gate="none", qk_norm=True, qk_norm_shared_across_heads=True,
                            output_gate=True, output_norm=True, k_shift=True, v_shift=True,
                            rope=True, rope_base=500000.0, mlp_width=256),
}


def assert_logits_match(actual, expected, name):
  rms, mx = error_ratios(actual, expected)
  rms_tol, max_tol = IMPORTED_LOGITS_F32
  assert rms <= rms_tol and mx <= max_tol, (
      f"{name}: rms error ratio {rms:.3g} (tol {rms_tol:g}), max {mx:.3g} (tol {max_tol:g})")


def forward(model, ids):
  return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))


def copy_fixture(tmp_path, name="fox_pro"):
  """A writable copy of a fixture: (directory, config dict, tensors dict)."""
  d = tmp_path / name
  shutil.copytree(os.path.join(DATA, name), d)
  with open(d / "config.json") as f:
    config = json.load(f)
  return d, config, dict(load_file(str(d / "model.safetensors")))


def write_checkpoint(d, config, tensors):
  with open(d / "config.json", "w") as f:
    json.dump(config, f)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(d / "model.safetensors"))


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_logits(name):
  cfg, model = convert.load_authors_checkpoint(os.path.join(DATA, name), attn_impl="xla")
  for field, value in EXPECTED_FIELDS[name].items():
    assert getattr(cfg, field) == value, field
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads) == (97, 64, 2, 4)
  assert cfg.dtype == "float32" and cfg.qk_norm_eps == 1e-5 and cfg.norm_eps == 1e-6
  expected = load_file(os.path.join(DATA, name, "expected.safetensors"))
  logits = forward(model, expected["input_ids"])
  assert logits.shape == (2, 23, 97)
  assert_logits_match(logits, expected["logits"], name)


def test_qk_norm_eps_is_observable():
  # The fixtures must be able to tell the authors' QK-norm eps (1e-5) from norm_eps (1e-6),
  # otherwise the tolerance above could not catch that mapping error.
  cfg, model = convert.load_authors_checkpoint(os.path.join(DATA, "fox_pro"),
                                               attn_impl="reference", qk_norm_eps=1e-6)
  expected = load_file(os.path.join(DATA, "fox_pro", "expected.safetensors"))
  with pytest.raises(AssertionError):
    assert_logits_match(forward(model, expected["input_ids"]), expected["logits"], "eps 1e-6")


def test_wrong_model_type(tmp_path):
  d, config, tensors = copy_fixture(tmp_path)
  config["model_type"] = "llama"
  write_checkpoint(d, config, tensors)
  with pytest.raises(ValueError, match="model_type is 'llama'"):
    convert.load_authors_checkpoint(str(d))


def test_missing_tensor(tmp_path):
  d, config, tensors = copy_fixture(tmp_path)
  del tensors["model.layers.1.attn.k_proj.shift_proj.weight"]
  write_checkpoint(d, config, tensors)
  with pytest.raises(ValueError,
                     match=r"missing tensor 'model\.layers\.1\.attn\.k_proj\.shift_proj"):
    convert.load_authors_checkpoint(str(d))


def test_shape_mismatch(tmp_path):
  d, config, tensors = copy_fixture(tmp_path)
  tensors["model.layers.0.attn.o_proj.weight"] = np.zeros((64, 48), np.float32)
  write_checkpoint(d, config, tensors)
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.attn\.o_proj\.weight' has shape "
                     r"\(64, 48\), expected \(64, 64\)"):
    convert.load_authors_checkpoint(str(d))


def test_unused_tensor(tmp_path):
  # A tensor the config does not account for (here: a forget gate while the config says
  # 'none') must not be dropped silently.
  d, config, tensors = copy_fixture(tmp_path, "transformer_pro")
  tensors["model.layers.0.attn.fgate_proj.weight"] = np.zeros((4, 64), np.float32)
  write_checkpoint(d, config, tensors)
  with pytest.raises(ValueError, match=r"not used.*model\.layers\.0\.attn\.fgate_proj\.weight"):
    convert.load_authors_checkpoint(str(d))


@pytest.mark.parametrize("key,value,match", [
    ("num_kv_heads", 2, "num_kv_heads=2"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("fgate_type", "sometimes", "fgate_type='sometimes'"),
    ("ogate_act", "tanh", "ogate_act='tanh'"),
    ("use_flux_capacitor", True, r"unknown option\(s\) \['use_flux_capacitor'\]"),
])
def test_unsupported_option(tmp_path, key, value, match):
  d, config, tensors = copy_fixture(tmp_path)
  config[key] = value
  write_checkpoint(d, config, tensors)
  with pytest.raises(ValueError, match=match):
    convert.load_authors_checkpoint(str(d))


def test_option_invalid_for_model_names_source(tmp_path):
  # silu output gate with output norm is a combination ModelConfig rejects.
  d, config, tensors = copy_fixture(tmp_path)
  config["ogate_act"] = "silu"
  write_checkpoint(d, config, tensors)
  with pytest.raises(ValueError, match="authors' config maps to an invalid ModelConfig: "
                     "output_gate_act"):
    convert.load_authors_checkpoint(str(d))


def test_shared_qk_norm_inferred_from_shape(tmp_path):
  # Configs written before qk_norm_share_param_across_head existed: the q_norm shape decides.
  d, config, tensors = copy_fixture(tmp_path)
  del config["qk_norm_share_param_across_head"]
  write_checkpoint(d, config, tensors)
  cfg, _ = convert.load_authors_checkpoint(str(d), attn_impl="reference")
  assert cfg.qk_norm_shared_across_heads


def test_tied_embeddings(tmp_path):
  d, config, tensors = copy_fixture(tmp_path, "fox_llama")
  config["tie_word_embeddings"] = True
  tensors["lm_head.weight"] = tensors["model.embeddings.weight"] + 1.0
  write_checkpoint(d, config, tensors)
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    convert.load_authors_checkpoint(str(d))
  del tensors["lm_head.weight"]
  write_checkpoint(d, config, tensors)
  cfg, model = convert.load_authors_checkpoint(str(d), attn_impl="reference")
  assert cfg.tie_embeddings and model.lm_head is None
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]),
                                tensors["model.embeddings.weight"])


def test_read_safetensors_bfloat16(tmp_path):
  from safetensors.flax import save_file as save_jax
  rng = np.random.default_rng(0)
  arrays = {"a": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
            "b": rng.normal(size=(7,)).astype(np.float32), "c": np.arange(4, dtype=np.int32)}
  save_jax({k: jnp.asarray(v) for k, v in arrays.items()}, str(tmp_path / "x.safetensors"))
  got = convert.read_safetensors(str(tmp_path / "x.safetensors"))
  assert sorted(got) == ["a", "b", "c"]
  for k, v in arrays.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape
    np.testing.assert_array_equal(np.asarray(got[k]), v)


def test_sharded_checkpoint(tmp_path):
  d, config, tensors = copy_fixture(tmp_path, "fox_llama")
  os.remove(d / "model.safetensors")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  weight_map = {}
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(d / shard))
    weight_map.update({k: shard for k in keys})
  with open(d / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  _, model = convert.load_authors_checkpoint(str(d), attn_impl="reference")
  expected = load_file(str(d / "expected.safetensors"))
  assert_logits_match(forward(model, expected["input_ids"]), expected["logits"], "sharded")


def test_cli_roundtrip(tmp_path, capsys):
  src = os.path.join(DATA, "transformer_pro")
  out = tmp_path / "converted"
  assert cli.convert_main([src, str(out), "--attn_impl", "reference"]) == 0
  assert "fox-convert:" in capsys.readouterr().out
  assert cli.convert_main([src, str(out)]) == 2
  assert "already holds a conversion; pass --overwrite" in capsys.readouterr().err
  (out / "notes.txt").write_text("kept")  # --overwrite replaces the conversion only
  assert cli.convert_main([src, str(out), "--attn_impl", "reference", "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == ["model_config.json", "notes.txt", "params"]
  assert os.listdir(tmp_path) == ["converted"]  # no staging directory left
  cfg, model = convert.load_converted(str(out))
  assert cfg.attn_impl == "reference" and cfg.rope and cfg.forget_gate == "none"
  expected = load_file(os.path.join(src, "expected.safetensors"))
  assert_logits_match(forward(model, expected["input_ids"]), expected["logits"], "converted")
  # params that do not match the model config fail with a message naming them
  fields = json.loads((out / "model_config.json").read_text())
  (out / "model_config.json").write_text(json.dumps(dict(fields, vocab_size=98)))
  with pytest.raises(ValueError, match=r"converted/params: cannot be restored as the model "
                     r"model_config\.json describes \(parameter embed\.embedding is stored with "
                     r"shape \(97, 64\), the model needs \(98, 64\)\)"):
    convert.load_converted(str(out))
  (out / "model_config.json").write_text(json.dumps(fields))
  for root, _, files in os.walk(out / "params"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"damaged")
  with pytest.raises(ValueError, match=r"converted/params: cannot be restored .*damaged"):
    convert.load_converted(str(out))


def test_cli_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.convert_main(["--help"])
  assert e.value.code == 0 and "fox-convert" in capsys.readouterr().out
  assert cli.convert_main([str(tmp_path), str(tmp_path / "out")]) == 2
  assert "no config.json" in capsys.readouterr().err


FLA_CONFIG = dict(model_type="forgetting_transformer", vocab_size=97, hidden_size=64,
                  num_hidden_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True,
                  use_output_gate=True, hidden_ratio=4, hidden_act="swish", norm_eps=1e-6,
                  fuse_norm=True, fuse_swiglu=True, tie_word_embeddings=False)


def test_fla_config_mapping():
  cfg = convert.fla_config(FLA_CONFIG)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_width) == (4, 2, 16, 256)
  assert cfg.forget_gate == "full" and cfg.qk_norm and not cfg.qk_norm_shared_across_heads
  assert cfg.output_gate and not (cfg.output_norm or cfg.k_shift or cfg.v_shift or cfg.rope)


@pytest.mark.parametrize("key,value,match", [
    ("window_size", 512, "window_size=512"),
    ("qkv_bias", True, "qkv_bias=True"),
    ("attnres_block_size", 4, "attnres_block_size=4"),
    ("hidden_act", "powlu", "hidden_act='powlu'"),
    ("model_type", "forgetting_transformer-project_fox", "expected 'forgetting_transformer'"),
])
def test_fla_config_unsupported(key, value, match):
  with pytest.raises(ValueError, match=match):
    convert.fla_config(dict(FLA_CONFIG, **{key: value}))


def test_fla_directory_rejected_by_authors_loader():
  with pytest.raises(ValueError, match="use load_fla_checkpoint"):
    convert.authors_config(FLA_CONFIG)

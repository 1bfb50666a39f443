"""Malformed and hostile checkpoints: each must fail with one ValueError naming the file.

Checkpoints are downloads, so the importer treats them as untrusted: wrong dtypes, non-finite
weights, overlapping tensors, shard names leaving the directory, malformed configs, indexes
and safetensors headers. Most tests stop at the reader (``read_safetensors``,
``read_checkpoint_dir``) or at the config and build no model. The ``fox-convert`` tests check
the command's contract: one line ``fox-convert: <message>`` on stderr, exit status 2, and no
output left behind.
"""

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fox_jax import cli, convert, converted, safetensors_io
from tests.fox_jax.test_convert import DATA, FLA_CONFIG

WEIGHT = "model.layers.0.mlp.down_proj.weight"  # [64, 256] in every fixture


def fixture(tmp_path, name="fox_llama"):
  """A writable copy of a fixture's config.json and model.safetensors: (dir, config, tensors)."""
  d = tmp_path / name
  d.mkdir()
  for f in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(DATA, name, f), d / f)
  with open(d / "config.json") as f:
    config = json.load(f)
  return d, config, dict(load_file(str(d / "model.safetensors")))


def save(d, config=None, tensors=None):
  if config is not None:
    (d / "config.json").write_text(json.dumps(config))
  if tensors is not None:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(d / "model.safetensors"))


def raw_safetensors(path, header, data=b"", header_len=None):
  """A safetensors file written byte by byte: 8-byte little-endian header length, header."""
  text = header if isinstance(header, bytes) else json.dumps(header).encode()
  size = len(text) if header_len is None else header_len
  path.write_bytes(struct.pack("<Q", size) + text + data)


def shard_index(d, weight_map):
  """Replaces model.safetensors by an index with this weight map."""
  if (d / "model.safetensors").exists():
    os.remove(d / "model.safetensors")
  (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def run_cli(capsys, *args):
  """(exit status, the stderr lines) of fox-convert."""
  try:
    status = cli.convert_main([str(a) for a in args])
  except SystemExit as e:
    status = e.code
  return status, capsys.readouterr().err.splitlines()


# -- dtypes, non-finite values, overlapping tensors -------------------------------------

@pytest.mark.parametrize("dtype,stored", [("int32", "I32"), ("int64", "I64"), ("uint8", "U8"),
                                          ("bool", "BOOL")])
def test_integer_weight_rejected(tmp_path, dtype, stored):
  d, config, tensors = fixture(tmp_path)
  tensors[WEIGHT] = tensors[WEIGHT].astype(dtype)
  save(d, tensors=tensors)
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{WEIGHT}' is stored as "
                     rf"{stored}; weights must be floating point"):
    convert.read_checkpoint_dir(str(d))


def test_integer_weight_in_state_dict_rejected():
  cfg = convert.fla_config(FLA_CONFIG)
  state = {r.source: np.zeros(r.source_shape, np.float32) for r in convert.fla_rules(cfg)}
  state["model.norm.weight"] = np.ones(64, np.int32)
  with pytest.raises(ValueError, match="fla state dict: tensor 'model.norm.weight' has dtype "
                     "int32; weights must be floating point"):
    convert.load_fla_model(state, FLA_CONFIG)


@pytest.mark.parametrize("case", ["nan", "inf", "float64 beyond float32"])
def test_non_finite_weight_rejected(tmp_path, case):
  d, config, tensors = fixture(tmp_path)
  w = tensors[WEIGHT].astype(np.float64 if case == "float64 beyond float32" else np.float32)
  w[0, :3] = dict(nan=np.nan, inf=-np.inf).get(case, 1e300)
  tensors[WEIGHT] = w
  save(d, tensors=tensors)
  with pytest.raises(ValueError, match=rf"{re.escape(str(d))}: tensor '{WEIGHT}' has 3 "
                     r"non-finite value\(s\) \(NaN or infinite in float32\) among 16384"):
    convert.load_authors_checkpoint(str(d))


@pytest.mark.parametrize("offsets_b", [[0, 16], [8, 24], [12, 28]])
def test_overlapping_tensors_rejected(tmp_path, offsets_b):
  path = tmp_path / "x.safetensors"
  raw_safetensors(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": offsets_b}},
                  bytes(32))
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: tensors 'a' and 'b' share bytes"):
    convert.read_safetensors(str(path))


def test_adjacent_and_empty_tensors_accepted(tmp_path):
  # The overlap check must not refuse what is legal: touching spans and empty tensors.
  path = tmp_path / "x.safetensors"
  raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]},
                         "c": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
                         "__metadata__": {"format": "pt"}},
                  np.arange(2, dtype=np.float32).tobytes() + np.ones(4, np.float16).tobytes())
  got = convert.read_safetensors(str(path))
  np.testing.assert_array_equal(got["a"], [0, 1])
  np.testing.assert_array_equal(got["b"], np.ones(4, np.float16))
  assert got["c"].shape == (0,)


# -- files confined to the checkpoint directory -----------------------------------------

@pytest.mark.parametrize("case", ["dotdot", "absolute", "system file", "symlinked shard",
                                  "symlinked folder"])
def test_shard_outside_directory_rejected(tmp_path, case):
  good, _, tensors = fixture(tmp_path)  # a valid checkpoint next door
  d, _, _ = fixture(tmp_path, "fox_pro")
  name = {"dotdot": "../fox_llama/model.safetensors",
          "absolute": str(good / "model.safetensors"), "system file": "/etc/passwd",
          "symlinked shard": "link.safetensors", "symlinked folder": "sub/model.safetensors"}[case]
  (d / "link.safetensors").symlink_to(good / "model.safetensors")
  (d / "sub").symlink_to(good)
  shard_index(d, {k: name for k in tensors})
  problem = "is an absolute path" if name.startswith("/") else "lies outside the checkpoint"
  with pytest.raises(ValueError, match=rf"model\.safetensors\.index\.json: weight_map entry "
                     rf"'.*': '{re.escape(name)}' {problem}"):
    convert.read_checkpoint_dir(str(d))


def test_symlinked_file_outside_directory_rejected(tmp_path):
  good, _, _ = fixture(tmp_path)
  d, _, _ = fixture(tmp_path, "fox_pro")
  os.remove(d / "model.safetensors")
  (d / "model.safetensors").symlink_to(good / "model.safetensors")
  with pytest.raises(ValueError, match=r"model\.safetensors: resolves to .*outside the "
                     "checkpoint directory"):
    convert.read_checkpoint_dir(str(d))


def test_hugging_face_cache_layout_accepted(tmp_path):
  # Not a fix but the limit of one: the hub cache's snapshot files are symlinks into the
  # repository's blobs/, and such a snapshot directory must still import.
  repo = tmp_path / "models--org--fox"
  (repo / "blobs").mkdir(parents=True)
  snapshot = repo / "snapshots" / "0123abc"
  snapshot.mkdir(parents=True)
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(DATA, "fox_llama", name), repo / "blobs" / f"hash-{name}")
    (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", f"hash-{name}"))
  config, tensors = convert.read_checkpoint_dir(str(snapshot))
  assert config["model_type"] == convert.AUTHORS_MODEL_TYPE and WEIGHT in tensors


def _hub_snapshot(tmp_path, blobs_target):
  """<repo>/snapshots/rev/ with config.json and model.safetensors as the hub links them,
  <repo>/blobs being a symlink to ``blobs_target``: (snapshot, repo)."""
  repo = tmp_path / "models--org--fox"
  snapshot = repo / "snapshots" / "rev"
  snapshot.mkdir(parents=True)
  (repo / "blobs").symlink_to(blobs_target)
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(DATA, "fox_llama", name), blobs_target / f"hash-{name}")
    (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", f"hash-{name}"))
  return snapshot, repo


def test_hub_layout_with_symlinked_blobs_rejected(tmp_path):
  # blobs/ as a symlink could lead anywhere (the probe pointed it at /): only a real blobs/
  # directory beside snapshots/ makes the exception.
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  snapshot, _ = _hub_snapshot(tmp_path, elsewhere)
  with pytest.raises(ValueError, match=r"rev/config\.json: resolves to .*elsewhere/hash-config"
                     r"\.json, outside the checkpoint directory"):
    convert.read_checkpoint_dir(str(snapshot))


def test_hub_index_name_climbing_out_rejected(tmp_path):
  # The probe's escape: blobs -> /, and an index entry climbing up to any file. The name is
  # refused before anything is opened (the message used to report the file's size).
  secret = tmp_path / "secret.bin"
  secret.write_bytes(b"\xff" * 100)
  repo = tmp_path / "models--org--fox"
  snapshot = repo / "snapshots" / "rev"
  snapshot.mkdir(parents=True)
  (repo / "blobs").symlink_to("/")
  shutil.copy(os.path.join(DATA, "fox_llama", "config.json"), snapshot / "config.json")
  name = "../" * 30 + str(secret).lstrip("/")
  (snapshot / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {WEIGHT: name}}))
  with pytest.raises(ValueError, match=r"weight_map entry .* lies outside the checkpoint "
                     r"directory .*'\.\.' is not allowed in shard names") as e:
    convert.read_checkpoint_dir(str(snapshot))
  assert "bytes" not in str(e.value)
  # with a real blobs/ too: an index names files in the snapshot, never above it
  (repo / "blobs").unlink()
  (repo / "blobs").mkdir()
  shutil.copy(os.path.join(DATA, "fox_llama", "model.safetensors"), repo / "blobs" / "w")
  (snapshot / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {WEIGHT: "../../blobs/w"}}))
  with pytest.raises(ValueError, match=r"'\.\./\.\./blobs/w' lies outside"):
    convert.read_checkpoint_dir(str(snapshot))


# -- a config claiming more (or fewer) layers than the checkpoint holds -------------------

def _no_model(*args, **kwargs):
  raise AssertionError("the model was built before the tensor names were checked")


@pytest.mark.parametrize("layers", [1000, 10**9])
def test_too_many_layers_fail_before_the_model_is_built(tmp_path, monkeypatch, layers):
  # Building even an abstract model of 1000 layers took minutes before the quick "missing
  # tensor" error; the names are now checked against the rules, which need only the config.
  d, config, _ = fixture(tmp_path)
  save(d, config=dict(config, num_hidden_layers=layers))
  monkeypatch.setattr(convert, "DecoderLM", _no_model)
  made = []

  def counted_rule(*args):  # the rules are made lazily: a few layers' worth, not 10**9
    made.append(None)
    assert len(made) < 10_000, "all the config's rules were made before the names were checked"
    return rule(*args)

  rule = convert.Rule
  monkeypatch.setattr(convert, "Rule", counted_rule)
  with pytest.raises(ValueError, match=rf"{re.escape(str(d))}: missing tensor "
                     r"'model\.layers\.2\.attn_norm\.weight'"):
    convert.load_authors_checkpoint(str(d))


def test_too_few_layers_fail_before_the_model_is_built(tmp_path, monkeypatch):
  d, config, _ = fixture(tmp_path)
  save(d, config=dict(config, num_hidden_layers=1))
  monkeypatch.setattr(convert, "DecoderLM", _no_model)
  # the unused tensors are counted and a few named: a message stays one short line
  with pytest.raises(ValueError, match=r"10 tensor\(s\) not used by the import .*: "
                     r"'model\.layers\.1\.attn\.fgate_proj\.bias', .* and 5 more$"):
    convert.load_authors_checkpoint(str(d))


# -- malformed configs, indexes and safetensors files -----------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda c: [c], "config must be a JSON object, got a list"),
    (lambda c: "{not json", "config is not valid JSON"),
    (lambda c: "[" * 100000 + "]" * 100000, "config is not valid JSON"),
    (lambda c: {k: v for k, v in c.items() if k != "num_heads"},
     "missing required key 'num_heads'"),
    (lambda c: {k: v for k, v in c.items() if k != "vocab_size"},
     "missing required key 'vocab_size'"),
    (lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"},
     "missing required key 'num_hidden_layers'"),
    (lambda c: dict(c, hidden_size=None), "hidden_size must be a positive integer, got None"),
    (lambda c: dict(c, num_heads="4"), "num_heads must be a positive integer, got '4'"),
    (lambda c: dict(c, qk_norm="false"), "qk_norm must be true or false, got 'false'"),
    (lambda c: dict(c, rope_base=[1]), r"rope_base must be a finite number, got \[1\]"),
    (lambda c: dict(c, fgate_type="bias_only", decay_time_min=2.0),
     "decay_time_min and decay_time_max must be given together"),
])
def test_bad_config(tmp_path, edit, message):
  d, config, _ = fixture(tmp_path)
  value = edit(config)
  (d / "config.json").write_text(value if isinstance(value, str) else json.dumps(value))
  with pytest.raises(ValueError, match=rf"{re.escape(str(d))}/config\.json: .*{message}"):
    convert.load_authors_checkpoint(str(d))


def _index_cases():
  def write(d, tensors, index):
    shard_index(d, {})
    (d / "model.safetensors.index.json").write_text(
        index if isinstance(index, str) else json.dumps(index))

  def shards(d, tensors, split, mapped):
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:split]}, str(d / "a.safetensors"))
    save_file({k: tensors[k] for k in names[3:]}, str(d / "b.safetensors"))
    shard_index(d, {k: "a.safetensors" if i < mapped else "b.safetensors"
                    for i, k in enumerate(names)})

  def shard_a_directory(d, tensors):
    shards(d, tensors, len(tensors), len(tensors))
    (d / "sub").mkdir()
    names = sorted(tensors)
    shard_index(d, {k: "a.safetensors" if i < 3 else "sub" for i, k in enumerate(names)})

  index = r"model\.safetensors\.index\.json"
  return {
      "no weight_map": (lambda d, t: write(d, t, {"metadata": {}}),
                        rf"{index}: weight_map must be an object .*got null"),
      "weight_map a list": (lambda d, t: write(d, t, {"weight_map": ["a"]}),
                            rf"{index}: weight_map must be an object .*got a list"),
      "index a list": (lambda d, t: write(d, t, "[]"),
                       rf"{index}: index must be a JSON object, got a list"),
      "index not json": (lambda d, t: write(d, t, "{"), rf"{index}: index is not valid JSON"),
      "empty weight_map": (lambda d, t: write(d, t, {"weight_map": {}}),
                           rf"{index}: weight_map lists no tensors"),
      "shard not a name": (lambda d, t: write(d, t, {"weight_map": {"x": 3}}),
                           rf"{index}: weight_map entry 'x': 3 is not a shard file name"),
      "missing shard": (lambda d, t: write(d, t, {"weight_map": {"x": "model-1.safetensors"}}),
                        rf"{index}: shard 'model-1.safetensors' .*does not exist"),
      # a.safetensors holds the first 3 tensors, the index maps only 2 to it
      "shard with a tensor mapped elsewhere": (
          lambda d, t: shards(d, t, 3, 2),
          r"a\.safetensors: holds tensor '.*', which model\.safetensors\.index\.json maps to "
          r"'b\.safetensors'"),
      # a.safetensors holds 2 tensors, the index maps 3 to it
      "shard lacking a mapped tensor": (
          lambda d, t: shards(d, t, 2, 3),
          rf"{index}: weight_map puts tensor '.*' in 'a\.safetensors', which does not hold it"),
      # every shard is checked before any is read: a.safetensors holding tensors meant for
      # 'sub' must not be what the message is about
      "shard a directory": (
          shard_a_directory,
          rf"{index}: shard 'sub' \(holding e\.g\. '.*'\) is a directory, not a file"),
  }


@pytest.mark.parametrize("case", list(_index_cases()))
def test_bad_index(tmp_path, case):
  make, message = _index_cases()[case]
  d, _, tensors = fixture(tmp_path)
  make(d, tensors)
  with pytest.raises(ValueError, match=message):
    convert.read_checkpoint_dir(str(d))


F32 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
# name -> (header (dict or raw bytes), data, header length to write or None, message)
MALFORMED = {
    "empty file": (None, b"", None, "0 bytes, too short for a safetensors file"),
    "huge header length": ({"a": F32}, bytes(16), 2**62,
                           r"header length 4611686018427387904 exceeds the file size"),
    "header length past the end": ({"a": F32}, bytes(16), 10**6,
                                   "header length 1000000 exceeds the file size"),
    "header not json": (b"{nope", b"", None, "safetensors header is not valid JSON"),
    "header too deep": (b"[" * 50000 + b"]" * 50000, b"", None,
                        "safetensors header is not valid JSON"),
    "header a list": ([1, 2], b"", None, "safetensors header must be a JSON object, got a list"),
    "duplicate name": (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                       b'"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}',
                       bytes(16), None, "name 'a' appears twice"),
    "entry not an object": ({"a": 3}, b"", None, "tensor 'a': header entry must be an object"),
    "dtype missing": ({"a": {"shape": [4], "data_offsets": [0, 16]}}, bytes(16), None,
                      "tensor 'a' has unsupported dtype None"),
    "dtype a list": ({"a": dict(F32, dtype=["F32"])}, bytes(16), None,
                     r"tensor 'a' has unsupported dtype \['F32'\]"),
    "shape a string": ({"a": dict(F32, shape="4")}, bytes(16), None,
                       "tensor 'a': shape must be a list of non-negative integers"),
    "shape negative": ({"a": dict(F32, shape=[-4])}, bytes(16), None,
                       "tensor 'a': shape must be a list of non-negative integers"),
    "offsets floats": ({"a": dict(F32, data_offsets=[0.0, 16.0])}, bytes(16), None,
                       "tensor 'a': data_offsets must be two integers"),
    "offsets reversed": ({"a": dict(F32, shape=[0], data_offsets=[16, 0])}, bytes(16), None,
                         "tensor 'a': data_offsets must be two integers 0 <= start <= end"),
    "size and shape differ": ({"a": dict(F32, shape=[3])}, bytes(16), None,
                              r"tensor 'a': data_offsets \[0, 16\] hold 16 bytes, but F32 of "
                              r"shape \[3\] needs 12"),
    "huge shape": ({"a": dict(F32, shape=[2**30, 2**30])}, bytes(16), None,
                   "tensor 'a': data_offsets .* hold 16 bytes"),
    # zero elements, but numpy cannot make the array: refused as too large, naming the file
    "zero-size, dimension beyond int64": (
        {"a": dict(F32, shape=[10**30, 0], data_offsets=[0, 0])}, b"", None,
        r"tensor 'a': shape \[10+, 0\] is too large for an array"),
    "zero-size, dimension 2**63": (
        {"a": dict(F32, shape=[2**63, 0], data_offsets=[0, 0])}, b"", None,
        r"tensor 'a': shape \[9223372036854775808, 0\] is too large"),
    "zero-size, dimensions overflowing": (
        {"a": dict(F32, shape=[2**62, 2**62, 0], data_offsets=[0, 0])}, b"", None,
        "tensor 'a': shape .* is too large"),
    "65 dimensions": ({"a": dict(F32, shape=[1] * 65, data_offsets=[0, 4])}, bytes(4), None,
                      "tensor 'a': shape has 65 dimensions, at most 64 can be read"),
    "truncated data": ({"a": dict(F32, shape=[8], data_offsets=[0, 32])}, bytes(16), None,
                       r"tensor 'a': data_offsets \[0, 32\] run past the end of the data "
                       r"\(16 bytes\): the file is truncated"),
    "metadata a list": ({"__metadata__": [1]}, b"", None, "__metadata__ must be an object"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors(tmp_path, case):
  header, data, header_len, message = MALFORMED[case]
  path = tmp_path / "model.safetensors"
  if header is None:
    path.write_bytes(data)
  else:
    raw_safetensors(path, header, data, header_len)
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .*{message}"):
    convert.read_safetensors(str(path))


def test_numpy_error_names_file_and_tensor(tmp_path, monkeypatch):
  # Should a shape pass the checks and numpy still refuse it, the message names the file
  # and the tensor (numpy's own said neither).
  monkeypatch.setattr(safetensors_io, "MAX_RANK", 100, raising=False)
  path = tmp_path / "model.safetensors"
  raw_safetensors(path, {"a": dict(F32, shape=[1] * 65, data_offsets=[0, 4])}, bytes(4))
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: tensor 'a' \(F32, shape "
                     r"\[1, 1, .*\) cannot be read \(ValueError: .*\)"):
    convert.read_safetensors(str(path))


def test_truncated_real_checkpoint(tmp_path):
  d, _, _ = fixture(tmp_path)
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[:-100])
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor '.*': data_offsets .* run "
                     "past the end of the data .*truncated"):
    convert.read_checkpoint_dir(str(d))


# -- fox-convert and converted checkpoints ----------------------------------------------

def _cli_cases():
  def config_list(d, t):
    (d / "config.json").write_text("[]")

  def missing_shard(d, t):
    shard_index(d, {k: "model-00001-of-00002.safetensors" for k in t})

  def integer_weight(d, t):
    save(d, tensors=dict(t, **{WEIGHT: t[WEIGHT].astype(np.int64)}))

  def nan_weight(d, t):
    w = t[WEIGHT].copy()
    w[1, 2] = np.nan
    save(d, tensors=dict(t, **{WEIGHT: w}))

  def no_num_heads(d, t):
    config = json.loads((d / "config.json").read_text())
    del config["num_heads"]
    save(d, config=config)

  def escaping_shard(d, t):
    shard_index(d, {k: "../elsewhere/model.safetensors" for k in t})

  def huge_header(d, t):
    raw_safetensors(d / "model.safetensors", {}, b"", 2**40)

  def not_a_directory(d, t):
    shutil.rmtree(d)
    d.write_text("")

  def missing(d, t):
    shutil.rmtree(d)

  def zero_size_huge_shape(d, t):
    raw_safetensors(d / "model.safetensors",
                    {"x": {"dtype": "F32", "shape": [10**30, 0], "data_offsets": [0, 0]}})

  def long_shard_name(d, t):
    shard_index(d, {k: "x" * 5000 for k in t})

  def long_tensor_name(d, t):
    save(d, tensors=dict(t, **{"y" * 5000: t[WEIGHT]}))

  return {
      "config a list": (config_list, "config.json: config must be a JSON object"),
      "missing shard": (missing_shard, "model.safetensors.index.json: shard"),
      "integer weight": (integer_weight, "model.safetensors: tensor"),
      "NaN weight": (nan_weight, "has 1 non-finite value"),
      "no num_heads": (no_num_heads, "config.json: authors' config: missing required key"),
      "escaping shard": (escaping_shard, "lies outside the checkpoint directory"),
      "huge header": (huge_header, "model.safetensors: safetensors header length"),
      "checkpoint not a directory": (not_a_directory, "not a directory"),
      "checkpoint missing": (missing, "no such directory"),
      "zero-size huge shape": (zero_size_huge_shape,
                               "model.safetensors: tensor 'x': shape [1000000000000000000000"),
      "long shard name": (long_shard_name, "model.safetensors.index.json: shard 'xxxxxxxx"),
      "long tensor name": (long_tensor_name, "1 tensor(s) not used by the import"),
  }


@pytest.mark.parametrize("case", list(_cli_cases()))
def test_cli_bad_checkpoint_one_line(tmp_path, capsys, case):
  make, message = _cli_cases()[case]
  d, _, tensors = fixture(tmp_path)
  make(d, tensors)
  out_parent = tmp_path / "out"
  out_parent.mkdir()
  status, err = run_cli(capsys, d, out_parent / "new" / "converted")
  assert status == 2 and len(err) == 1, err
  assert err[0].startswith("fox-convert: ") and message in err[0], err
  assert len(err[0]) < 600, err  # names from the files are cut short
  assert os.listdir(out_parent) == []  # neither the output nor its new parent is left


def test_cli_bad_attn_impl_names_the_flag(tmp_path, capsys):
  d, _, _ = fixture(tmp_path)
  status, err = run_cli(capsys, d, tmp_path / "out", "--attn_impl", "pallas-gpu")
  assert status == 2 and len(err) == 1 and "--attn_impl" in err[0], err
  assert "config.json" not in err[0], err
  assert not (tmp_path / "out").exists()
  # in Python too: the override is at fault, not the checkpoint's config.json
  with pytest.raises(ValueError, match=r"^invalid override attn_impl='pallas-gpu': attn_impl "
                     "must be one of"):
    convert.load_authors_checkpoint(str(d), attn_impl="pallas-gpu")


def test_cli_usage_error_one_line(capsys):
  status, err = run_cli(capsys)
  assert status == 2 and len(err) == 1 and err[0].startswith("fox-convert: "), err


def test_cli_refuses_non_empty_directory(tmp_path, capsys):
  d, _, _ = fixture(tmp_path)
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep")
  for extra in ([], ["--overwrite"]):  # not a conversion: refused even with --overwrite
    status, err = run_cli(capsys, d, mine, *extra)
    assert status == 2 and len(err) == 1 and "not empty and holds no earlier conversion" in err[0]
  assert os.listdir(mine) == ["notes.txt"]


def _tree(root):
  """{relative path: contents} of every file under ``root``."""
  out = {}
  for where, _, files in os.walk(root):
    for name in files:
      path = os.path.join(where, name)
      out[os.path.relpath(path, root)] = open(path, "rb").read()
  return out


def _foreign(out, d):
  (out / "params" / "weights.bin").write_text("precious")


def _orbax_like(out, d):
  # orbax's file names, plus one file that is not orbax's
  for name in ("_CHECKPOINT_METADATA", "_METADATA", "d/0123abcd", "ocdbt.process_0/manifest.ocdbt"):
    (out / "params" / name).parent.mkdir(parents=True, exist_ok=True)
    (out / "params" / name).write_text("{}")
  (out / "params" / "d" / "weights.bin").write_text("precious")


def _params_a_symlink(out, d):
  (out / "params").rmdir()
  mine = out.parent / "mine"
  mine.mkdir()
  for name in ("_CHECKPOINT_METADATA", "_METADATA"):
    (mine / name).write_text("{}")
  (out / "params").symlink_to(mine)


@pytest.mark.parametrize("config,params", [
    ("other tool", _foreign), ("fox-jax", _foreign), ("fox-jax", _orbax_like),
    ("fox-jax", _params_a_symlink), ("other tool", _orbax_like)])
def test_cli_overwrite_replaces_only_a_conversion(tmp_path, capsys, config, params):
  # The probe: a model_config.json of some other tool and a params/ with its data. An
  # earlier conversion is recognised by both files, not by the config's name alone.
  d, hf, _ = fixture(tmp_path)
  out = tmp_path / "foreign"
  (out / "params").mkdir(parents=True)
  text = (json.dumps(convert.authors_config(hf).to_dict()) if config == "fox-jax"
          else '{"some": "other tool"}')
  (out / "model_config.json").write_text(text)
  params(out, d)
  before = _tree(out)
  for extra in (["--overwrite"], []):
    status, err = run_cli(capsys, d, out, *extra)
    assert status == 2 and len(err) == 1, err
    assert "not empty and holds no earlier conversion" in err[0], err
  assert _tree(out) == before
  assert sorted(os.listdir(out)) == ["model_config.json", "params"]


def test_earlier_conversion_recognised(tmp_path):
  # The positive side without writing a conversion (test_cli_roundtrip overwrites a real
  # one): orbax's files and a fox-jax model config make an earlier conversion.
  _, hf, _ = fixture(tmp_path)
  out = tmp_path / "out"
  for name in ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "manifest.ocdbt",
               "d/0fd8caa7", "array_metadatas/process_0", "ocdbt.process_0/d/06bcd854"):
    (out / "params" / name).parent.mkdir(parents=True, exist_ok=True)
    (out / "params" / name).write_text("{}")
  (out / "model_config.json").write_text(json.dumps(convert.authors_config(hf).to_dict()))
  with pytest.raises(ValueError, match="already holds a conversion; pass --overwrite"):
    converted.check_output_dir(str(out), overwrite=False)
  converted.check_output_dir(str(out), overwrite=True)

"""load_model (run directories and converted checkpoints) and fox-generate, end to end."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fox_jax import cli, convert, decode, evaluate, loading
from fox_jax import train as train_lib
from fox_jax.cli import generate_main
from tests.fox_jax.test_convert import DATA as AUTHORS_DATA


def snapshot(path):
  """Every entry under ``path`` with its size and mtime: what 'unchanged' means."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.lstat(p)
      out[os.path.relpath(p, path)] = (st.st_size if name in files else None, st.st_mtime_ns)
  return out


def exit_code(argv):
  """generate_main's return value, or the code argparse exits with (a bad flag value)."""
  try:
    return generate_main(argv)
  except SystemExit as e:
    return e.code


def one_line(err):
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  return lines[0]


def test_load_run_equals_checkpoint_and_train_model(run_dir):
  before = snapshot(run_dir)
  # On all 8 devices (the saved mesh, fsdp = -1): restores a one-device run onto eight, and
  # shares its compiled functions with fox-generate below.
  loaded = loading.load_model(run_dir)
  assert loaded.source == "run" and loaded.step == 2
  assert isinstance(loaded.tokenizer, loading.ByteTokenizer)
  setup = train_lib.build(train_lib.load_config(run_dir))
  step, params = evaluate.restore_params(run_dir, setup)
  assert step == 2
  got = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ids = jnp.asarray(np.stack([loaded.tokenizer.encode("def f(x):\n  return x + 1")[:16]] * 2))
  forward = jax.jit(lambda model, x: model(x))
  np.testing.assert_array_equal(np.asarray(forward(loaded.model, ids)),
                                np.asarray(jax.jit(lambda p, x: setup.model(p)(x))(params, ids)))
  assert snapshot(run_dir) == before


def test_fox_generate_greedy_and_sampled_equal_decode_generate(run_dir, capsys, tmp_path):
  before = snapshot(run_dir)
  prompt = "import os\n"
  loaded = loading.load_model(run_dir)
  ids = loaded.tokenizer.encode(prompt)
  for flags, kwargs in (([], {}),
                        (["--temperature", "0.8", "--top_k", "20", "--seed", "3"],
                         dict(temperature=0.8, top_k=20, rng=jax.random.key(3)))):
    assert generate_main([run_dir, "--prompt", prompt, "--max_new_tokens", "12"] + flags) == 0
    out = decode.generate(loaded.model, jnp.asarray(ids[None]), 12, **kwargs)
    expected = loaded.tokenizer.decode(np.asarray(out)[0, len(ids):])
    assert capsys.readouterr().out == expected + "\n"
  # the same prompt from a file, and an explicit step
  (tmp_path / "prompt.txt").write_text(prompt)
  assert generate_main([run_dir, "--prompt_file", str(tmp_path / "prompt.txt"),
                        "--max_new_tokens", "12", "--step", "2"]) == 0
  out = decode.generate(loaded.model, jnp.asarray(ids[None]), 12)
  assert capsys.readouterr().out == loaded.tokenizer.decode(np.asarray(out)[0, len(ids):]) + "\n"
  assert snapshot(run_dir) == before


def test_byte_tokenizer_stops_at_end_of_document():
  tok = loading.ByteTokenizer()
  assert tok.encode("ab").tolist() == [257, 97, 98]
  assert tok.decode([104, 105, 258, 120]) == "hi"


def test_fox_generate_user_errors(run_dir, capsys, tmp_path):
  with pytest.raises(SystemExit) as e:
    generate_main(["--help"])
  assert e.value.code == 0 and "fox-generate" in capsys.readouterr().out
  neither = tmp_path / "neither"
  neither.mkdir()
  (neither / "notes.txt").write_text("x")
  hf = tmp_path / "hf"
  shutil.copytree(os.path.join(AUTHORS_DATA, "fox_pro"), hf)
  before = snapshot(run_dir)
  cases = [
      ([str(tmp_path / "missing"), "--prompt", "x"], "no such directory"),
      ([str(neither), "--prompt", "x"], "is neither a fox-train run directory"),
      ([str(hf), "--prompt", "x"], "looks like a Hugging Face checkpoint; convert it first"),
      ([run_dir, "--prompt", ""], "the prompt is empty"),
      ([run_dir], "either --prompt TEXT or --prompt_file FILE"),
      ([run_dir, "--prompt", "x", "--prompt_file", "f"], "either --prompt TEXT or"),
      ([run_dir, "--prompt_file", str(tmp_path / "nope.txt")], "cannot read --prompt_file"),
      ([run_dir, "--prompt", "x", "--temperature", "-1"], "--temperature must be"),
      ([run_dir, "--prompt", "x", "--temperature", "nan"], "--temperature must be"),
      ([run_dir, "--prompt", "x", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
      ([run_dir, "--prompt", "x", "--top_k", "5"], "--top_k needs --temperature > 0"),
      ([run_dir, "--prompt", "x", "--temperature", "1", "--top_k", "100000"],
       "--top_k must be at most the vocabulary size 384"),
      ([run_dir, "--prompt", "x", "--seed", "-1"], "--seed must be in [0, 2**32)"),
      ([run_dir, "--prompt", "x", "--step", "7"], "has no checkpoint at step 7 (it has [2])"),
      ([run_dir, "--prompt", "x", "--max_new_tokens", "many"], "invalid int value"),
  ]
  for argv, message in cases:
    assert exit_code(argv) == 2, argv
    line = one_line(capsys.readouterr().err)
    assert line.startswith("fox-generate: ") and message in line, (argv, line)
  assert snapshot(run_dir) == before

  # A broken (only) checkpoint: one line, nothing moved.
  broken = tmp_path / "broken"
  shutil.copytree(run_dir, broken)
  state = broken / "checkpoints" / "2" / "state"
  for root, _, files in os.walk(state / "ocdbt.process_0"):
    for name in files:
      os.remove(os.path.join(root, name))
  before = snapshot(str(broken))
  for step in ([], ["--step", "2"]):
    assert generate_main([str(broken), "--prompt", "x"] + step) == 2
    line = one_line(capsys.readouterr().err)
    assert "cannot be restored" in line or "can be restored" in line, line
  assert snapshot(str(broken)) == before


def write_char_tokenizer(path, vocab_size):
  """A tiny offline tokenizer.json: one token per printable character, at most vocab_size."""
  tokenizers = pytest.importorskip("tokenizers")
  chars = [chr(c) for c in range(32, 127)][:vocab_size - 1]
  vocab = {"<eos>": 0, **{ch: i + 1 for i, ch in enumerate(chars)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<eos>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
  tok.decoder = tokenizers.decoders.Fuse()
  tok.add_special_tokens(["<eos>"])
  tok.save(str(path / loading.TOKENIZER_FILE))
  (path / loading.TOKENIZER_CONFIG_FILE).write_text(json.dumps({"eos_token": "<eos>"}))


def test_converted_checkpoint(tmp_path, capsys):
  out = tmp_path / "converted"
  assert cli.convert_main([os.path.join(AUTHORS_DATA, "fox_pro"), str(out),
                       "--attn_impl", "reference"]) == 0
  capsys.readouterr()
  # No tokenizer recorded: the model alone on request, one line otherwise.
  bare = loading.load_model(str(out), require_tokenizer=False)
  assert bare.tokenizer is None and bare.source == "converted" and bare.step is None
  assert generate_main([str(out), "--prompt", "x"]) == 2
  assert "records no tokenizer" in one_line(capsys.readouterr().err)
  (out / loading.TOKENIZER_CONFIG_FILE).write_text(json.dumps({"tokenizer_class": "GPTNeoXTokenizer"}))
  assert generate_main([str(out), "--prompt", "x"]) == 2
  assert "names the tokenizer 'GPTNeoXTokenizer', which is not available offline" in one_line(
      capsys.readouterr().err)
  assert generate_main([str(out), "--prompt", "x", "--step", "1"]) == 2
  assert "has no steps" in one_line(capsys.readouterr().err)

  write_char_tokenizer(out, bare.model.cfg.vocab_size)
  before = snapshot(str(out))
  loaded = loading.load_model(str(out))
  _, expected_model = convert.load_converted(str(out))
  for a, b in zip(jax.tree.leaves(nnx.state(loaded.model)), jax.tree.leaves(nnx.state(expected_model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  prompt = "hello world"
  ids = loaded.tokenizer.encode(prompt)
  assert loaded.tokenizer.decode(ids) == prompt
  assert generate_main([str(out), "--prompt", prompt, "--max_new_tokens", "6"]) == 0
  gen = decode.generate(loaded.model, jnp.asarray(ids[None]), 6)
  assert capsys.readouterr().out == loaded.tokenizer.decode(np.asarray(gen)[0, len(ids):]) + "\n"
  assert snapshot(str(out)) == before

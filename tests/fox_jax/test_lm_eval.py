"""The lm-evaluation-harness adapter (fox_jax.evals.harness_lm.FoxLM, fox-eval --task lm_eval).

Offline: task YAMLs over JSONL files written here, HF caches under tmp, HF_DATASETS_OFFLINE.
Every number lm_eval gets is recomputed independently from the tiny model's per-token
losses (``token_losses``) and its greedy decoding (``decode.generate``).
"""

import importlib
import json
import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fox_jax import decode, evals, loading
from fox_jax import train as train_lib
from fox_jax.cli import eval_main
from fox_jax.data import tokenizer
from fox_jax.errors import UsageError
from fox_jax.evals import common, harness
from fox_jax.model import DecoderLM
from tests.fox_jax.test_train import tiny_config
from tests.tolerances import assert_close

PNG = b"\x89PNG\r\n\x1a\n"
L = 64        # max_length: one bucket, so that every batch below shares one compilation
GEN = 12      # max_gen_toks
BOS = tokenizer.BOS_ID


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
  """lm_eval, imported with every Hugging Face cache under tmp and the Hub offline."""
  hf = tmp_path_factory.mktemp("hf")
  saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_DATASETS_CACHE",
                                          "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
  os.environ.update({"HF_HOME": str(hf), "HF_DATASETS_CACHE": str(hf / "datasets"),
                     "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
  mod = pytest.importorskip("lm_eval")
  import datasets.config  # read at import: set again in case another test imported it first
  datasets.config.HF_DATASETS_CACHE = str(hf / "datasets")
  datasets.config.HF_DATASETS_OFFLINE = True
  yield mod
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture(scope="module")
def tiny_model():
  """The 1-layer model of test_evals (reference attention: the fastest to compile)."""
  return DecoderLM(train_lib.model_config(tiny_config()), rngs=nnx.Rngs(0))


def ids(text, bos=False):
  return ([BOS] if bos else []) + list(text.encode("utf-8"))


@nnx.jit
def _losses_and_logits(model, x, y):
  return model.token_losses(x, y), model(x)


def forward(model, inputs, targets=None):
  """Per-token losses [n] and logits [n, V] of one row of n <= L inputs, computed at one
  shape (padded on the right with PAD tokens, which a causal model never reads back)."""
  n = len(inputs)
  targets = list(targets) if targets is not None else [0] * n
  pad = [tokenizer.PAD_ID] * (L - n)
  losses, logits = _losses_and_logits(model, jnp.asarray([list(inputs) + pad]),
                                      jnp.asarray([targets + pad]))
  return np.asarray(losses, np.float64)[0, :n], np.asarray(logits)[0, :n]


def direct_logp(model, context, continuation):
  """-sum of the model's per-token losses over ``continuation`` after ``context`` (ids),
  the input the last L tokens, as lm_eval's left truncation."""
  whole = (list(context) + list(continuation))[-(L + 1):]
  losses, _ = forward(model, whole[:-1], whole[1:])
  return -float(losses[-len(continuation):].sum())


def next_tokens(model, context, n):
  """The model's greedy continuation by n full forward passes (no cache)."""
  context = list(context)
  for _ in range(n):
    context.append(int(np.argmax(forward(model, context)[1][-1])))
  return context[-n:]


def greedy_text(model, prompt_ids):
  """decode.generate's greedy GEN new tokens of a prompt, as text up to EOS."""
  out = decode.generate(model, jnp.asarray([prompt_ids], jnp.int32), GEN)
  return common.decode_until_eos(tokenizer, np.asarray(out)[0, len(prompt_ids):])


def expected_prompt(prompt):
  """BOS + the prompt, left-truncated to max_length - max_gen_toks tokens."""
  return ids(prompt, bos=True)[-(L - GEN):]


def write_tasks(root, docs, until):
  """A multiple-choice, a loglikelihood, a rolling and a generate_until task over JSONL."""
  root.mkdir(exist_ok=True)
  specs = {
      "fox_mc": ("multiple_choice", 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                 "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
      "fox_ll": ("loglikelihood", 'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
                 "target_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: perplexity\n"),
      "fox_roll": ("loglikelihood_rolling", "doc_to_text: ''\ndoc_to_target: \"{{text}}\"\n"
                   "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"),
      "fox_gen": ("generate_until", 'doc_to_text: "{{prompt}}"\ndoc_to_target: ""\n'
                  f"generation_kwargs:\n  until: [{json.dumps(until)}]\n  max_gen_toks: {GEN}\n"
                  "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"),
  }
  for name, (kind, fields) in specs.items():
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs[name]))
    (root / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\noutput_type: {kind}\n{fields}")
  return str(root)


def make_docs(model):
  """Docs whose expected outputs the tests recompute: the loglikelihood task has one target
  that is the model's greedy byte (is_greedy True) and one that is not; generate_until's
  stop string is a piece of the first prompt's greedy output (which it must cut there)."""
  mc = [{"question": f"Q{i}: what comes after {i}?", "choices": [str(i + 1), "x", "nothing"],
         "answer": i % 3} for i in range(3)]
  mc.append({"question": "long " * 30 + "question?", "choices": ["yes", "no"], "answer": 0})
  ll = []
  for i in range(10, 90):  # a context whose greedy next token is a printable byte
    context = f"Item {i}:"
    (tok,) = next_tokens(model, ids(context, bos=True), 1)
    if 33 <= tok < 127:
      ll = [{"context": context, "target": chr(tok)},
            {"context": context, "target": chr(33 + (tok - 32) % 94)}]
      break
  assert ll, "no context with a printable greedy byte"
  roll = [{"text": "short doc fits in one window"},
          {"text": "a long document " * 10 + "that needs several windows of L tokens"}]
  # Two prompts of one length after truncation (one decode.generate shape): the second is
  # left-truncated.
  gen = [{"prompt": ("def f(x):\n  return x + 1\n" * 3)[:L - GEN - 1]}, {"prompt": "z" * 80}]
  assert len(expected_prompt(gen[0]["prompt"])) == len(expected_prompt(gen[1]["prompt"]))
  text = greedy_text(model, expected_prompt(gen[0]["prompt"]))
  until = next((text[i:i + 2] for i in range(1, len(text) - 1)
                if text[i].isascii() and text[i].isprintable()), text[1:3])
  return {"fox_mc": mc, "fox_ll": ll, "fox_roll": roll, "fox_gen": gen}, until


@pytest.fixture(scope="module")
def setup(lm_eval, tiny_model, tmp_path_factory):
  docs, until = make_docs(tiny_model)
  return docs, until, write_tasks(tmp_path_factory.mktemp("tasks"), docs, until)


def evaluate(lm_eval, lm, tasks, include_path, **kwargs):
  from lm_eval.tasks import TaskManager
  manager = TaskManager(include_path=include_path, include_defaults=False)
  return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=0,
                                 bootstrap_iters=0, **kwargs)


def test_loglikelihoods_and_rolling_equal_the_models_own_losses(lm_eval, tiny_model, setup):
  docs, _, path = setup
  from fox_jax.evals.harness_lm import FoxLM
  lm = FoxLM(tiny_model, tokenizer, max_length=L, batch_size=4)
  out = evaluate(lm_eval, lm, ["fox_mc", "fox_ll", "fox_roll"], path)
  samples = {t: sorted(s, key=lambda s: s["doc_id"]) for t, s in out["samples"].items()}

  got, want = [], []
  for doc, s in zip(docs["fox_mc"], samples["fox_mc"]):
    assert [tuple(a) for a in s["arguments"]] == [(doc["question"], " " + c)
                                                 for c in doc["choices"]]
    for choice, (logp, _) in zip(doc["choices"], s["filtered_resps"]):
      got.append(logp)
      want.append(direct_logp(tiny_model, ids(doc["question"], bos=True), ids(" " + choice)))
  assert any(len(ids(d["question"])) + 8 > L for d in docs["fox_mc"])  # one is truncated
  greedy_flags = []
  for doc, s in zip(docs["fox_ll"], samples["fox_ll"]):
    ((logp, greedy),) = s["filtered_resps"]
    got.append(logp)
    want.append(direct_logp(tiny_model, ids(doc["context"], bos=True), ids(doc["target"])))
    greedy_flags.append(greedy)
  assert greedy_flags == [True, False]
  assert out["results"]["fox_ll"]["acc,none"] == 0.5
  assert_close(got, want, np.float32, "loglikelihood")

  # Rolling: the short document is one window from BOS, the whole document's loss.
  short, long_ = (ids(d["text"]) for d in docs["fox_roll"])
  assert len(short) < L < 2 * L < len(long_)
  rolled = [s["filtered_resps"][0] for s in samples["fox_roll"]]
  whole = direct_logp(tiny_model, [BOS], short)
  windows = 0.0  # the long one: windows predicting tokens [s, e), inputs ([BOS] + doc)[e-L:e]
  full, start = [BOS] + long_, 0
  while start < len(long_):
    end = min(start + L, len(long_))
    losses, _ = forward(tiny_model, full[max(0, end - L):end], full[max(0, end - L) + 1:end + 1])
    windows -= float(losses[-(end - start):].sum())
    start = end
  assert_close(rolled, [whole, windows], np.float32, "rolling loglikelihood")
  words = sum(len(re.split(r"\s+", d["text"])) for d in docs["fox_roll"])
  assert out["results"]["fox_roll"]["word_perplexity,none"] == pytest.approx(
      np.exp(-(whole + windows) / words), rel=1e-5)


def test_is_greedy_and_batch_sizes_at_the_token_level(tiny_model):
  from fox_jax.evals.harness_lm import FoxLM
  context = ids("The answer is", bos=True)
  greedy = next_tokens(tiny_model, context, 5)
  other = greedy[:4] + [(greedy[4] + 1) % 256]
  pairs = [(context, greedy), (context, other), (ids("x" * 100, bos=True), ids("yz")),
           ([BOS], ids("a")), (ids("two", bos=True), ids(" words here"))]
  by_size = {b: FoxLM(tiny_model, tokenizer, max_length=L, batch_size=b).score_tokens(pairs)
             for b in (1, 4)}
  assert [g for _, g in by_size[4]][:2] == [True, False]
  assert by_size[1] == by_size[4]  # the same numbers whatever the batching
  want = [direct_logp(tiny_model, c, x) for c, x in pairs]
  assert_close([p for p, _ in by_size[4]], want, np.float32, "score_tokens")


def test_generate_until_stops_at_until_and_equals_greedy_decoding(lm_eval, tiny_model, setup):
  docs, until, path = setup
  from fox_jax.evals.harness_lm import FoxLM
  # batch_size 1: the shape of greedy_text, whose compilation it reuses.
  lm = FoxLM(tiny_model, tokenizer, max_length=L, batch_size=1, max_gen_toks=99)
  out = evaluate(lm_eval, lm, ["fox_gen"], path)
  got = [s["filtered_resps"][0] for s in sorted(out["samples"]["fox_gen"],
                                                key=lambda s: s["doc_id"])]
  full = [greedy_text(tiny_model, expected_prompt(d["prompt"])) for d in docs["fox_gen"]]
  assert got == [f.split(until)[0] for f in full]
  assert len(got[0]) < len(full[0])  # cut at the stop string


def test_hf_tokenizer_adds_its_bos(tiny_model, tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from fox_jax.evals.harness_lm import FoxLM
  vocab = {"<s>": 0, "</s>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="</s>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
  tok.decoder = tokenizers.decoders.Fuse()
  tok.add_special_tokens(["<s>", "</s>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                              "eos_token": "</s>"}))
  hf = loading.HFTokenizer(str(tmp_path / "tokenizer.json"))
  assert hf.encode("ab", add_bos=True, add_eos=True).tolist() == [0, 67, 68, 1]
  lm = FoxLM(tiny_model, hf, max_length=L, batch_size=4)
  assert lm.tok_encode("ab") == [0, 67, 68] and lm.prefix_token_id == 0
  assert lm.eot_token_id == 1 and lm.tok_decode([67, 68, 1, 67]) == "ab"
  ((logp, _),) = lm.score_tokens([(lm.tok_encode("hi"), lm.tok_encode("!", False))])
  assert_close([logp], [direct_logp(tiny_model, [0, 74, 75], [3])], np.float32, "hf")
  assert hf.encode("ab").tolist() == [67, 68]  # without flags: the file's post-processor


def test_buckets_bound_the_compiled_shapes():
  from fox_jax.evals.harness_lm import bucket_lengths
  assert bucket_lengths(64) == (64,)
  assert bucket_lengths(1000) == (64, 128, 256, 512, 1024)
  assert bucket_lengths(16384)[-1] == 16384 and len(bucket_lengths(16384)) == 9
  assert bucket_lengths(500, seq_chunk=96) == (192, 384, 768)


def test_without_lm_eval_a_one_line_error(monkeypatch):
  monkeypatch.delitem(sys.modules, "fox_jax.evals.harness_lm", raising=False)
  monkeypatch.setitem(sys.modules, "lm_eval", None)
  monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
  with pytest.raises(UsageError, match=r"needs the 'lm-eval' extra: pip install"):
    importlib.import_module("fox_jax.evals.harness_lm")
  with pytest.raises(UsageError, match="lm-eval"):
    harness.run(None, tokenizer, harness.Options(train_length=32, lm_eval_tasks=["x"]))


def test_fox_eval_task_lm_eval_and_the_fox_model_name(lm_eval, setup, run_dir, tmp_path,
                                                      capsys):
  _, _, path = setup
  out = str(tmp_path / "out")
  assert eval_main([run_dir, "--task", "lm_eval", "--lm_eval_tasks", "fox_mc,fox_roll",
                    "--lm_eval_include_path", path, "--limit", "2", "--batch_size", "4",
                    "--max_length", str(L), "--out", out]) == 0
  result = json.load(open(os.path.join(out, "lm_eval.json")))
  assert result["n_samples"]["fox_mc"]["effective"] == 2 and result["step"] == 2
  assert result["scores"]["fox_mc"]["metric"] == "acc"
  assert result["scores"]["fox_roll"]["metric"] == "word_perplexity"
  assert result["options"]["max_length"] == L and result["options"]["limit"] == 2
  assert open(os.path.join(out, "lm_eval.png"), "rb").read(8) == PNG
  assert "lm_eval fox_mc acc" in capsys.readouterr().out
  # lm_eval's own model registry: --model fox --model_args path=RUN,... (fox-lm-eval).
  from lm_eval.api.registry import get_model
  lm = get_model("fox").create_from_arg_string(f"path={run_dir},batch_size=2",
                                               {"device": "cpu", "batch_size": None})
  assert lm.max_length == 32 and lm.batch_size == 2  # the run's training length


def test_every_task_runs_on_a_converted_checkpoint(lm_eval, setup, tmp_path, capsys):
  """fox-eval's needle, passkey, MQAR and lm_eval on an authors' checkpoint converted by
  fox-convert, with its tokenizer beside it and --train_length (it records none); what each
  task computes is checked on tiny models elsewhere, here that it runs on this kind of path
  and reads nothing from (nor writes anything into) the checkpoint but its eval directory."""
  from fox_jax.cli import convert_main
  from tests.fox_jax.test_convert import DATA
  from tests.fox_jax.test_generate import write_char_tokenizer
  converted = tmp_path / "converted"
  assert convert_main([os.path.join(DATA, "fox_pro"), str(converted), "--attn_impl",
                       "reference"]) == 0
  write_char_tokenizer(converted, 97)  # the checkpoint's vocabulary
  _, _, path = setup
  runs = {
      "needle": ["--lengths", "300", "--depths", "50", "--modes", "standard"],
      "passkey": ["--lengths", "300", "--depths", "50", "--trials", "1"],
      "mqar": ["--lengths", "64", "--num_kv_pairs", "4", "--vocab", "32", "--num_examples", "8"],
      "lm_eval": ["--lm_eval_tasks", "fox_mc", "--lm_eval_include_path", path, "--limit", "2"],
  }
  for task, flags in runs.items():
    out = str(tmp_path / task)
    assert eval_main([str(converted), "--task", task, "--train_length", "128", "--out", out,
                      *flags]) == 0, (task, capsys.readouterr().err)
    result = json.load(open(os.path.join(out, f"{task}.json")))
    assert result["step"] is None and result["label"] == "converted (converted)"
    assert result["options"]["train_length"] == 128
  assert sorted(os.listdir(converted)) == ["model_config.json", "params", "tokenizer.json",
                                            "tokenizer_config.json"]
  capsys.readouterr()
  for argv, message in (
      ([str(converted), "--task", "needle"], "records no training length: give --train_length"),
      ([str(converted), "--task", "needle", "--train_length", "128", "--step", "3"],
       "has no steps"),
      ([str(converted), "--task", "per_token_loss", "--train_length", "128"],
       "--train_length do not apply to --task per_token_loss")):
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("args, message", [
    (["--task", "lm_eval"], "lm_eval needs task names"),
    (["--task", "lm_eval", "--lm_eval_tasks", "nope_task"], "unknown lm_eval task(s) nope_task"),
    (["--task", "lm_eval", "--lm_eval_tasks", "x", "--limit", "1.5"], "--limit must be"),
    (["--task", "lm_eval", "--lm_eval_tasks", "x", "--lm_eval_include_path", "/nonexistent"],
     "does not exist"),
    (["--task", "lm_eval", "--lm_eval_tasks", "fox_missing"], "could not load a task's data"),
    (["--task", "needle", "--lm_eval_tasks", "piqa"], "task needle takes no lm_eval_tasks"),
    (["--max_length", "64"], "--max_length do not apply to --task per_token_loss"),
])
def test_fox_eval_lm_eval_errors_are_one_line(lm_eval, setup, run_dir, tmp_path, capsys,
                                              monkeypatch, args, message):
  _, _, path = setup
  out = str(tmp_path / "out")
  if "nope_task" in args:
    # Unknown here and in lm_eval's own tasks; their index (seconds to build) left out.
    tasks_module = importlib.import_module("lm_eval.tasks")
    real = tasks_module.TaskManager
    monkeypatch.setattr(tasks_module, "TaskManager", lambda include_path=None, **_: real(
        include_path=include_path, include_defaults=False))
    args = args + ["--lm_eval_include_path", path]
  if "fox_missing" in args:  # a task whose YAML names a file that is not there
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "missing.yaml").write_text(
        f"task: fox_missing\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        f"{tmp_path / 'nothing.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
        f"doc_to_text: x\ndoc_to_target: y\n")
    args = args + ["--lm_eval_include_path", str(tmp_path / "tasks")]
  assert eval_main([run_dir, "--out", out] + args) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1 and err.startswith("fox-eval: "), err
  assert not os.path.exists(out)


def test_plot_draws_accuracies_and_perplexities(tmp_path):
  result = {"options": {"num_fewshot": 0, "max_length": 64, "limit": None},
            "scores": {"piqa": {"metric": "acc", "value": 0.6},
                       "wikitext": {"metric": "word_perplexity", "value": 30.5}}}
  evals.get("lm_eval").plot(result, str(tmp_path / "p.png"))
  assert open(tmp_path / "p.png", "rb").read(8) == PNG
  assert harness.headline("hellaswag", {"acc,none": 0.3, "acc_norm,none": 0.4}) == (
      "acc_norm", 0.4)
  assert harness.headline("piqa", {"acc,none": 0.3, "acc_stderr,none": 0.1}) == ("acc", 0.3)

"""MQAR: the generator (both variants), the training stream, loss weights, the evaluation.

The generator is checked by reading each example back: keys from the first half of the
vocabulary, values from the second, every query's answer its key's (last) value, labels at
the queries only, query offsets following the power law. The loss weights are checked
against a numpy cross-entropy of the model's own logits; the evaluation against a numpy
argmax of them and against an oracle that reads the answers out of the inputs.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fox_jax import run_config, rundir, sharding
from fox_jax import train as train_lib
from fox_jax.cli import eval_main
from fox_jax.data import Batch, dataset_from_config, mqar, tokenizer
from fox_jax.errors import UsageError
from fox_jax.evals import mqar as mqar_eval
from fox_jax.model import DecoderLM
from tests.tolerances import assert_close

PNG = b"\x89PNG\r\n\x1a\n"
RUN_STEPS = 12


def _assignments(row: np.ndarray, spec: mqar.Spec) -> tuple[dict, dict]:
  """({key: first value}, {key: last value}) of the pairs that open ``row``."""
  first, last = {}, {}
  for k, v in row[:spec.context_len].reshape(-1, 2).tolist():
    first.setdefault(k, v)
    last[k] = v
  return first, last


@pytest.mark.parametrize("variant, updates", [("standard", None), ("last_value", 3)])
def test_examples_are_pairs_then_queries_answered_by_the_last_value(variant, updates):
  spec = mqar.Spec(vocab=32, seq_len=48, num_kv_pairs=6, variant=variant, num_updates=updates)
  ex = mqar.generate(spec, 300, seed=1)
  assert ex.inputs.shape == ex.labels.shape == (300, 48) and ex.inputs.dtype == np.int32
  assert ex.inputs.min() >= 0 and ex.inputs.max() < 32
  n, c = spec.num_kv_pairs, spec.context_len
  assert c == 2 * (6 + (3 if updates else 0))
  changed = 0
  for row, lab in zip(ex.inputs, ex.labels):
    keys, values = row[:2 * n:2], row[1:2 * n:2]
    assert np.all(keys < 16) and len(set(keys.tolist())) == n      # first half, distinct
    assert np.all(values >= 16) and len(set(values.tolist())) == n  # second half, distinct
    first, last = _assignments(row, spec)
    assert set(first) == set(keys.tolist())  # updates reassign keys already there
    if updates:
      upd = row[2 * n:c].reshape(-1, 2)
      assert len(set(upd[:, 0].tolist())) == updates
      assert all(v != first[k] and v >= 16 for k, v in upd.tolist())  # a new value
    at = np.flatnonzero(lab != mqar.IGNORE)
    # Labels only at the queries: one per key, in the query region, at even offsets.
    assert len(at) == n and np.all(at >= c) and np.all((at - c) % 2 == 0)
    assert sorted(row[at].tolist()) == sorted(keys.tolist())
    for t in at:
      assert lab[t] == last[row[t]]
      changed += lab[t] != first[row[t]]
  assert (changed > 0) == (variant == "last_value")


def test_query_offsets_follow_the_power_law():
  """With one pair the query's slot is one draw of p(g) ~ (g + 1) ** (a - 1); with several,
  the slots are distinct and the first key's is that same draw."""
  for a in (0.01, 1.0):
    spec = mqar.Spec(vocab=8, seq_len=2 + 2 * 40, num_kv_pairs=1, power_a=a)
    ex = mqar.generate(spec, 20000, seed=0)
    slot = (np.argmax(ex.labels != mqar.IGNORE, axis=1) - spec.context_len) // 2
    freq = np.bincount(slot, minlength=spec.num_slots) / len(slot)
    p = mqar.query_weights(spec)
    assert np.abs(freq - p).max() < 0.015, (a, np.abs(freq - p).max())
  assert p == pytest.approx(np.full(40, 1 / 40))  # power 1: uniform
  assert mqar.query_weights(mqar.Spec(8, 82, 1))[0] > 0.2  # power 0.01: most come soon


def test_generation_is_a_function_of_the_seed():
  spec = mqar.Spec(64, 64, 8, "last_value")
  a, b, c = (mqar.generate(spec, 50, s) for s in (7, 7, 8))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.inputs, c.inputs)


def test_stream_rows_are_reproducible_and_each_epoch_reads_every_example_once():
  spec = mqar.Spec(32, 32, 4)
  n = 2 * mqar.BLOCK + 300  # a short last block
  ds = mqar.MQARDataset(spec, n, seed=3)
  all_examples = ds.examples(np.arange(n)).inputs
  key = lambda rows: sorted(map(bytes, rows))
  epoch0, epoch1 = ds.rows(0, n), ds.rows(n, n)
  assert key(epoch0.inputs) == key(epoch1.inputs) == key(all_examples)
  assert not np.array_equal(epoch0.inputs, epoch1.inputs)
  again = mqar.MQARDataset(spec, n, seed=3)
  for x, y in zip(ds.rows(n - 5, 10), again.rows(n - 5, 10)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(again.row(n + 1).inputs, epoch1.inputs[1])
  heldout = mqar.MQARDataset(spec, n, seed=3, split="heldout")
  assert not np.array_equal(heldout.rows(0, 8).inputs, ds.rows(0, 8).inputs)


def test_batch_weights_are_the_answers():
  ex = mqar.generate(mqar.Spec(32, 32, 4), 10, 0)
  b = mqar.to_batch(ex, offset=5)
  at = ex.labels != mqar.IGNORE
  np.testing.assert_array_equal(b.weights, at.astype(np.float32))
  np.testing.assert_array_equal(b.targets[at], ex.labels[at] + 5)
  np.testing.assert_array_equal(b.inputs, ex.inputs + 5)
  np.testing.assert_array_equal(b.targets[:, :-1][~at[:, :-1]], b.inputs[:, 1:][~at[:, :-1]])
  assert np.all(b.segment_ids == 1) and np.all(b.positions == np.arange(32))


def mqar_config(steps=2, **data):
  """A 1-layer FoX (Pro) on MQAR: vocabulary 32, 2 pairs in 32-token rows."""
  c = run_config.base_config()
  c.model.overrides.update({"num_layers": 1, "dtype": "float32", "attn_impl": "reference",
                            "vocab_size": 32})
  c.data.source = "mqar"
  c.data.update({"seq_len": 32, "global_batch": 16, "mqar_vocab": 32, "mqar_num_kv_pairs": 2,
                 "mqar_train_examples": 1000, "mqar_test_examples": 64, **data})
  c.optim.update({"peak_lr": 1e-2, "warmup_tokens": 2 * 32 * 16,
                  "total_tokens": steps * 32 * 16})
  c.mesh.update({"data": 1, "fsdp": -1})
  c.run.update({"log_every": 1, "val_rows": 32, "progress_bar": False,
                "checkpoint_every": 1000})
  c.eval.batch_size = 32
  return c


@pytest.mark.parametrize("field, value, message", [
    ("data.mqar_num_kv_pairs", 12, "config.data.seq_len must be at least 47 for 12 key-value"),
    ("data.mqar_variant", "newest", "config.data.mqar_variant must be one of"),
    ("data.mqar_num_updates", 3, "config.data.mqar_num_updates must be 0 (or unset) with"),
    ("data.mqar_vocab", 2, "config.data.mqar_vocab must be an int >= 4"),
    ("data.mqar_train_examples", 0, "config.data.mqar_train_examples must be an int >= 1"),
    ("data.source", "csv", "config.data.source must be one of ('builtin', 'text', 'tfds', 'longcrawl64', 'array_record', 'mqar')"),
    ("model.overrides.vocab_size", 16,
     "config.model.overrides.vocab_size must be >= 32 for config.data.mqar_vocab=32, got 16"),
])
def test_config_errors_name_the_field(field, value, message):
  c = mqar_config()
  block, name = field.rsplit(".", 1)
  node = c
  for part in block.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(UsageError, match=re.escape(message)) as e:
    train_lib.build(train_lib.prepare_config(c), jax.devices()[:1])
  assert "\n" not in str(e.value)


def test_the_source_is_picked_by_the_registry_and_old_configs_load():
  c = mqar_config()
  assert isinstance(dataset_from_config(c.data, "train"), mqar.MQARDataset)
  assert dataset_from_config(c.data, "heldout").num_examples == 64
  # A config saved before the mqar fields existed reads with their defaults.
  old = json.loads(run_config.config_to_json(run_config.base_config()))
  old["data"] = {k: v for k, v in old["data"].items() if not k.startswith("mqar_")}
  loaded = run_config.config_from_json(json.dumps(old), "config.json")
  run_config.check_fields(loaded)
  assert run_config.resume_changes(loaded, run_config.base_config()) == {}


def _logits_fn(model):
  """Jitted logits [B, T, V] of a DecoderLM (the reference the tests compare with)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
  return lambda ids: np.asarray(fn(state, jnp.asarray(ids)), np.float64)


def test_weights_mask_the_loss_exactly():
  """loss_sums over a batch weighted at the answers only is the answers' cross-entropy (and
  what the targets hold elsewhere does not matter)."""
  c = mqar_config(steps=RUN_STEPS)  # the run's below: one build
  setup = train_lib.build(c, jax.devices()[:1])
  params = jax.device_get(train_lib.init_state(setup, 0)["params"])
  batch = dataset_from_config(c.data, "train").rows(0, 4)
  scrambled = batch._replace(targets=np.where(batch.weights > 0, batch.targets,
                                              (batch.targets + 7) % 32))
  sums = jax.jit(lambda p, b: train_lib.loss_sums(setup, p, b)[:2])
  with sharding.activation_rules(setup.mesh):
    got = [sums(params, Batch(*map(jnp.asarray, b))) for b in (batch, scrambled)]
  logits = _logits_fn(setup.model(params))(batch.inputs)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch.targets[..., None], -1)[..., 0]
  at = batch.weights > 0
  assert int(at.sum()) == 4 * 2 and float(got[0][1]) == 8.0
  assert_close(float(got[0][0]), nll[at].sum(), jnp.float32, "answer loss")
  assert float(got[0][0]) == float(got[1][0])


class _Specials:
  """A tokenizer whose ids 0-2 are special (as LLaMA's)."""
  BOS_ID, EOS_ID = 1, 2
  special_ids = (0, 1, 2)


def _oracle(options, offset, last=True):
  """predict_fn that answers each token with the (last or first) value the pairs at the
  start of its row gave it (the grid has one number of pairs per length)."""
  spec_of = {length: spec for (length, _), spec in mqar_eval.cells(options).items()}
  assert len(spec_of) == len(mqar_eval.cells(options))

  def fn(ids):
    ids = np.asarray(ids) - offset
    out = np.zeros_like(ids)
    for r, row in enumerate(ids):
      first, final = _assignments(row, spec_of[len(row)])
      table = final if last else first
      out[r] = [table.get(int(t), 0) for t in row]
    return out + offset
  return fn


@pytest.mark.parametrize("variant", ["standard", "last_value"])
def test_an_oracle_scores_one_and_ids_keep_clear_of_special_tokens(variant, tmp_path):
  opts = mqar_eval.Options(train_length=32, lengths=("1x", 48), num_kv_pairs=(3, 16),
                           variant=variant, vocab=40, num_examples=20, batch_size=8)
  result = mqar_eval.run(None, _Specials(), opts, predict_fn=_oracle(opts, 3))
  assert result["token_offset"] == 3 and result["lengths"] == [32, 48]
  # 16 pairs do not fit in 32 or 48 tokens: those cells are left out.
  assert result["grid"] == [[1.0, 1.0], [None, None]]
  assert result["accuracy"] == 1.0 and result["chance"] == 1 / 20
  wrong = mqar_eval.run(None, _Specials(), opts, predict_fn=_oracle(opts, 3, last=False))
  assert (wrong["accuracy"] < 0.9) == (variant == "last_value")
  assert mqar_eval.run(None, tokenizer, opts, predict_fn=_oracle(opts, 0))["token_offset"] == 0
  mqar_eval.plot(result, str(tmp_path / "m.png"))
  assert open(tmp_path / "m.png", "rb").read(8) == PNG


def test_the_offset_is_the_first_clear_of_special_ids(tmp_path):
  assert mqar_eval.clear_offset(256, mqar_eval.special_ids(tokenizer)) == 0  # 256-258
  assert mqar_eval.clear_offset(300, {256, 257, 258}) == 259
  assert mqar_eval.clear_offset(10, {5, 20}) == 6 and mqar_eval.clear_offset(4, {5}) == 0
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"<s>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<s>"))
  tok.add_special_tokens(["<s>", "</s>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  from fox_jax.loading import HFTokenizer
  hf = HFTokenizer(str(tmp_path / "tokenizer.json"))
  assert hf.special_ids == (0, 1) and mqar_eval.clear_offset(8, mqar_eval.special_ids(hf)) == 2


def test_accuracy_is_the_numpy_argmax_of_the_models_logits():
  model = DecoderLM(train_lib.model_config(mqar_config()), rngs=nnx.Rngs(1))
  opts = mqar_eval.Options(train_length=32, lengths=(32,), num_kv_pairs=(2, 4), vocab=24,
                           num_examples=12, token_offset=4, batch_size=8, seed=5)
  result = mqar_eval.run(model, tokenizer, opts)
  logits = _logits_fn(model)
  for i, kv in enumerate((2, 4)):
    ex = mqar.generate(mqar.Spec(24, 32, kv), 12, [5, 32, kv])
    pred = np.argmax(logits(ex.inputs + 4), -1)
    at = ex.labels != mqar.IGNORE
    assert result["grid"][i] == [np.mean(pred[at] == ex.labels[at] + 4)]
  with pytest.raises(UsageError, match=r"mqar vocab 40 needs ids 0\.\.39, past the model's "
                     r"vocabulary of 32 \(give a smaller --vocab\)"):
    mqar_eval.run(model, tokenizer, mqar_eval.Options(train_length=32, vocab=40))


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "newest"}, "mqar variant must be one of"),
    ({"num_kv_pairs": (2, 2)}, "mqar num_kv_pairs repeat"),
    ({"num_kv_pairs": (40,)}, "no length in [32, 64] holds any of [40]"),
    ({"num_kv_pairs": (20,), "lengths": (200,), "vocab": 32}, "mqar num_kv_pairs must be at "
     "most the 16 keys of mqar vocab 32"),
    ({"variant": "last_value", "num_updates": 5, "num_kv_pairs": (4,)},
     "mqar num_updates must be an int in [1, mqar num_kv_pairs=4]"),
    ({"num_examples": 0}, "mqar num_examples must be an int >= 1"),
])
def test_options_errors_are_one_line(kwargs, message):
  with pytest.raises(UsageError) as e:
    mqar_eval.Options(train_length=32, **kwargs)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mqar") / "fox")
  result = train_lib.train(mqar_config(steps=RUN_STEPS), workdir, devices=jax.devices()[:1])
  return workdir, result


def test_a_short_mqar_run_lowers_the_answer_loss(mqar_run):
  workdir, result = mqar_run
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [d["loss"] for d in lines if "loss" in d]
  assert len(losses) == RUN_STEPS and result.step == RUN_STEPS
  # From uniform over the model's 32 ids towards uniform over the 16 values.
  assert losses[0] > np.log(32) - 0.3 and np.mean(losses[-3:]) < losses[0] - 0.4, losses
  assert np.isfinite(result.val_loss)


def test_fox_eval_task_mqar_on_a_run(mqar_run, tmp_path, capsys):
  workdir, _ = mqar_run
  assert eval_main([workdir, "--task", "mqar", "--num_kv_pairs", "2,4", "--num_examples",
                    "16", "--lengths", "1x"]) == 0
  result = json.load(open(os.path.join(workdir, "eval", "mqar.json")))
  # The run's own task: its ids (offset 0), vocabulary and variant.
  assert result["token_offset"] == 0 and result["options"]["vocab"] == 32
  assert result["step"] == RUN_STEPS and result["num_kv_pairs"] == [2, 4]
  assert np.shape(result["grid"]) == (2, 1) and 0 <= result["accuracy"] <= 1
  assert open(os.path.join(workdir, "eval", "mqar.png"), "rb").read(8) == PNG
  assert "mqar accuracy" in capsys.readouterr().out
  out = str(tmp_path / "out")
  for args, message in [
      (["--task", "mqar", "--depths", "0"], "task mqar takes no depths"),
      (["--task", "mqar", "--vocab", "64"], "mqar vocab 64 needs ids 0..63, past the model's"),
      (["--task", "needle"], "--task needle reads held-out text"),
      (["--task", "passkey"], "--task passkey writes text prompts, and"),
      ([], "--task per_token_loss reads held-out text"),
  ]:
    assert eval_main([workdir, "--out", out] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not os.path.exists(out)
  with pytest.raises(SystemExit):
    eval_main([workdir, "--task", "mqar", "--num_kv_pairs", "a"])
  assert "expected integers" in capsys.readouterr().err
  assert rundir.load_config(workdir).data.source == "mqar"


def test_cells_with_fewer_pairs_than_updates_are_left_out():
  """A last-value run's default grid (half, once and twice its pairs) keeps the cells that
  can reassign num_updates keys; with none left, num_updates is the error."""
  o = mqar_eval.Options(train_length=64, lengths=(64, 128), num_kv_pairs=(2, 4, 8),
                        variant="last_value", num_updates=4)
  assert sorted(mqar_eval.cells(o)) == [(64, 4), (64, 8), (128, 4), (128, 8)]
  with pytest.raises(UsageError, match=r"num_updates must be an int in \[1, mqar num_kv_pairs=2\]"):
    mqar_eval.Options(train_length=64, lengths=(64,), num_kv_pairs=(2,), variant="last_value",
                      num_updates=4)

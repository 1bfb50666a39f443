"""The evaluation registry: per-token loss, needle in a haystack, passkey; fox-eval --task.

Needle and passkey answers are made knowable with a stand-in generate_fn that reads the
answer out of the prompt (every cell scores 1) or answers wrongly (every cell scores 0); a
real tiny DecoderLM checks that the pipeline runs end to end and that each score agrees
with its own greedy continuation.
"""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fox_jax import decode, evals
from fox_jax import train as train_lib
from fox_jax.cli import eval_main
from fox_jax.data import tokenizer
from fox_jax.errors import UsageError
from fox_jax.evals import common, needle, passkey, per_token_loss
from fox_jax.model import DecoderLM
from tests.fox_jax.test_train import tiny_config
from tests.tolerances import assert_close

PNG = b"\x89PNG\r\n\x1a\n"


def _answer_stub(wrong=False):
  """generate_fn that 'reads' the needle or pass key out of each prompt (or a wrong one)."""
  def fn(ids, n):
    assert ids.ndim == 2 and np.all(ids[:, 0] == tokenizer.BOS_ID)
    rows = []
    for row in ids:
      text = tokenizer.decode(row)
      m = (re.search(r'BEST_THING = "([^"]*)"', text)
           or re.search(r"San Francisco is ([^.]*)\.", text)
           or re.search(r"pass key is (\d+)\.", text))
      ans = ("00000" if wrong else m.group(1)) + '"\n'
      rows.append(np.frombuffer(ans.encode()[:n].ljust(n), np.uint8))
    return np.stack(rows)
  return fn


@pytest.fixture(scope="module")
def corpus():
  return common.default_heldout_corpus()


@pytest.fixture(scope="module")
def tiny_model():
  """The model of the tiny run below (1 layer, reference attention: the fastest to
  compile), so that the prompts of equal shape below share compiled decoding."""
  return DecoderLM(train_lib.model_config(tiny_config()), rngs=nnx.Rngs(0))


def test_registry_names_each_evaluation_and_rejects_others():
  assert set(evals.EVALS) >= {"per_token_loss", "needle", "passkey"}
  for module in evals.EVALS.values():
    assert callable(module.run) and callable(module.plot) and "train_length" in (
        module.Options.__dataclass_fields__)
  with pytest.raises(UsageError, match="unknown evaluation 'nope'.*needle"):
    evals.get("nope")


def test_answers_end_at_the_end_of_document():
  """Tokens generated after an end-of-document token never join the answer."""
  from fox_jax.data import tokenizer as tok
  ids = np.concatenate([tok.encode(" 12", add_bos=False, add_eos=False), [tok.EOS_ID],
                        tok.encode("345", add_bos=False, add_eos=False)])
  assert common.decode_until_eos(tok, ids) == " 12"


def test_scoring_is_exact_match():
  assert needle.score(needle.ANSWER, " " + needle.ANSWER + '"\nx') == 1
  assert needle.score(needle.ANSWER, needle.ANSWER[:-1]) == 0
  assert needle.score(needle.ANSWER, needle.ANSWER.upper()) == 0
  assert passkey.extract_digits(" 12345. Remember") == "12345"
  assert passkey.extract_digits("abc 7 and 99") == "7"
  assert passkey.extract_digits("no digits") is None
  assert passkey.score("12345", " 12345 is") == 1
  assert passkey.score("12345", " 123456") == 0
  assert passkey.score("12345", " 1234") == 0


def test_prompts_have_their_length_and_the_passage_at_a_boundary():
  hay = common.encode(tokenizer, "aaaa.\nbbbb.\ncccc.\ndddd.\n" * 4)
  pre, passage, query = (np.array([tokenizer.BOS_ID]), common.encode(tokenizer, "NEEDLE"),
                         common.encode(tokenizer, "?"))
  nl = common.encode(tokenizer, "\n")
  for depth, at in ((0, 0), (50, 48), (100, 96)):
    ids, got = common.build_prompt(pre, hay, passage, query, 104, depth, nl)
    assert len(ids) == 104 and got == at
    text = tokenizer.decode(ids)
    assert text.endswith("?") and "NEEDLE" in text
    assert at == 0 or text[text.index("NEEDLE") - 1] == "\n"
  with pytest.raises(UsageError, match="too short"):
    common.build_prompt(pre, hay, passage, query, 8, 50, nl)
  assert common.parse_lengths(["0.5x", "64", "4x"], 32, ()) == (16, 64, 128)
  assert common.parse_lengths(None, 32, (1, 2)) == (32, 64)
  for bad in (["x4"], ["-3"], ["1.5"], ["64", "2x"]):
    with pytest.raises(UsageError):
      common.parse_lengths(bad, 32, ())
  with pytest.raises(UsageError, match="depths"):
    needle.Options(train_length=32, depths=[0, 120])
  with pytest.raises(UsageError, match="modes"):
    needle.Options(train_length=32, modes=["hard"])


def test_needle_default_grid_is_11_by_11_and_scores_a_reader_one(corpus, tmp_path):
  opts = needle.Options(train_length=256, corpus=corpus)
  lengths = needle.grid_lengths(tokenizer, opts)
  assert len(lengths) == 11 and len(opts.depths) == 11 and lengths[-1] == 1024
  assert lengths[0] > needle.fixed_length(tokenizer, opts)
  for style in ("code", "prose"):
    opts = needle.Options(train_length=256, style=style, lengths=[300, "2x"],
                          depths=[0, 33, 100], corpus=corpus)
    right = needle.run(None, tokenizer, opts, generate_fn=_answer_stub())
    assert right["accuracy"] == {"easy": 1.0, "standard": 1.0}
    assert np.shape(right["grid"]["easy"]) == (3, 2)  # [depth][length]
    assert {c["length"] for c in right["cells"]} == {300, 512}
    wrong = needle.run(None, tokenizer, opts, generate_fn=_answer_stub(wrong=True))
    assert wrong["accuracy"] == {"easy": 0.0, "standard": 0.0}
  json_path, png_path = evals.write("needle", right, str(tmp_path / "out"))
  again = json.load(open(json_path))
  assert again["grid"] == right["grid"] and "exact match" in again["scoring"]
  assert open(png_path, "rb").read(8) == PNG


def test_passkey_scores_a_reader_one_and_a_guesser_zero(tmp_path):
  opts = passkey.Options(train_length=64, lengths=["4x", 400], depths=[0, 50, 100], trials=3,
                         batch_size=4)
  right = passkey.run(None, tokenizer, opts, generate_fn=_answer_stub())
  assert right["accuracy"] == 1.0 and right["accuracy_by_length"] == {"256": 1.0, "400": 1.0}
  assert np.shape(right["grid"]) == (3, 2)
  keys = [c["passkey"] for c in right["cells"]]
  assert len(keys) == 18 and all(len(k) == 5 and k.isdigit() for k in keys)
  assert len(set(keys)) > 1 and keys == [c["passkey"] for c in passkey.prompts(tokenizer, opts)]
  wrong = passkey.run(None, tokenizer, opts, generate_fn=_answer_stub(wrong=True))
  assert wrong["accuracy"] == 0.0 and wrong["cells"][0]["extracted"] == "00000"
  _, png = evals.write("passkey", right, str(tmp_path))
  assert open(png, "rb").read(8) == PNG


def test_real_tiny_model_scores_agree_with_its_greedy_output(corpus, tiny_model):
  opts = needle.Options(train_length=32, lengths=[300], depths=[0, 100], modes=["standard"],
                        corpus=corpus)
  result = needle.run(tiny_model, tokenizer, opts)
  haystack = common.corpus_text_ids(tokenizer, corpus, 300)
  ids = np.stack([p["ids"] for p in needle.prompts(tokenizer, opts, haystack)])
  want = decode.generate(tiny_model, jnp.asarray(ids, jnp.int32), result["max_new_tokens"])
  for c, row in zip(result["cells"], np.asarray(want)[:, 300:]):
    assert c["output"] == tokenizer.decode(row)
    assert c["score"] == needle.score(needle.ANSWER, c["output"])
  pk = passkey.run(tiny_model, tokenizer, passkey.Options(train_length=32, lengths=[300],
                                                          depths=[50], trials=2))
  for c in pk["cells"]:
    assert c["score"] == int(passkey.extract_digits(c["output"]) == c["passkey"])


def test_per_token_loss_on_a_model_matches_its_forward(corpus, tiny_model):
  opts = per_token_loss.Options(train_length=16, lengths=[32], max_docs=3, batch_size=3,
                                corpus=corpus)
  result = per_token_loss.run(tiny_model, tokenizer, opts)
  assert result["eval_length"] == 32 and result["num_docs"] == 3
  rows = corpus.tokens[corpus.doc_starts[:3, None] + np.arange(33)].astype(np.int32)
  want = tiny_model.token_losses(jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:]))
  assert_close(result["loss_by_position"], np.asarray(want).mean(0), jnp.float32,
               "loss by position")
  assert result["loss_beyond"] == pytest.approx(np.mean(result["loss_by_position"][16:]))


def test_fox_eval_task_needle_and_passkey_on_a_run(run_dir, tmp_path, capsys):
  # Shapes as in the tests above (2 rows of 300 tokens): the compiled decoding is reused.
  assert eval_main([run_dir, "--task", "needle", "--lengths", "300", "--depths", "0,100",
                    "--modes", "standard"]) == 0
  result = json.load(open(os.path.join(run_dir, "eval", "needle.json")))
  assert result["step"] == 2 and result["lengths"] == [300] and result["depths"] == [0, 100]
  assert np.shape(result["grid"]["standard"]) == (2, 1) and "easy" not in result["grid"]
  assert open(os.path.join(run_dir, "eval", "needle.png"), "rb").read(8) == PNG
  out = str(tmp_path / "pk")
  assert eval_main([run_dir, "--task", "passkey", "--lengths", "300", "--depths", "50",
                    "--trials", "2", "--out", out, "--step", "2"]) == 0
  assert json.load(open(os.path.join(out, "passkey.json")))["grid"] in ([[0.0]], [[0.5]],
                                                                         [[1.0]])
  assert "passkey accuracy" in capsys.readouterr().out
  # The default task keeps today's fox-eval; --lengths sets how far loss is evaluated.
  assert eval_main([run_dir, "--lengths", "1.5x", "--out", str(tmp_path / "ptl")]) == 0
  result = json.load(open(os.path.join(run_dir, "eval", "per_token_loss.json")))
  assert result["eval_length"] == 48 and len(result["loss_by_position"]) == 48
  assert np.isfinite(result["val_loss"]) and "loss_beyond" in result


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown evaluation 'nope'"),
    (["--depths", "0,50"], "--depths do not apply to --task per_token_loss"),
    (["--task", "needle", "--trials", "3"], "task needle takes no trials"),
    (["--task", "needle", "--depths", "0,150"], "depths must be percentages"),
    (["--task", "passkey", "--lengths", "abc"], "length 'abc'"),
    (["--task", "needle", "--lengths", "40"], "too short"),
    (["--task", "needle", "--step", "7"], "no checkpoint at step 7"),
    (["--task", "passkey", "--lengths", "nan"], "length 'nan'"),
    (["--lengths", "16"], "needs a length of at least the training length 32"),
])
def test_fox_eval_task_errors_are_one_line(run_dir, tmp_path, capsys, args, message):
  out = str(tmp_path / "out")
  assert eval_main([run_dir, "--out", out] + args) == 2
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1 and err.startswith("fox-eval: ")
  assert not os.path.exists(out)


def test_fox_eval_checks_every_run_before_writing(run_dir, tmp_path, capsys):
  """A second run that is not one is refused before the first is evaluated or written."""
  out = str(tmp_path / "out")
  assert eval_main([run_dir, str(tmp_path / "nothing"), "--task", "passkey", "--lengths",
                    "300", "--out", out]) == 2
  err = capsys.readouterr().err
  assert "nothing" in err and err.count("\n") == 1 and err.startswith("fox-eval: ")
  assert not os.path.exists(out)

"""Evaluation writes loss against position (JSON, PNG), validation loss and a report."""

import json
import os

import jax
import numpy as np
import pytest

from fox_jax import evaluate
from fox_jax import train as train_lib
from fox_jax.cli import eval_main
from tests.fox_jax.test_train import tiny_config


def test_smooth_is_a_centred_moving_average():
  ramp = np.arange(400, dtype=np.float64)
  # A centred average leaves a straight line unchanged away from the right end.
  np.testing.assert_allclose(evaluate.smooth(ramp, 101)[:350], ramp[:350])
  noise = np.random.default_rng(0).normal(size=400)
  got = evaluate.smooth(noise, 101)
  assert got[0] == noise[0] and got[3] == pytest.approx(noise[2:5].mean())
  assert got[200] == pytest.approx(noise[150:251].mean())
  assert got[-1] == pytest.approx(noise[-51:].mean())
  np.testing.assert_allclose(evaluate.smooth(noise, 1), noise)


def test_eval_writes_json_png_and_report(tmp_path):
  runs = []
  for preset in ("fox_pro_tiny", "transformer_pro_tiny"):
    c = tiny_config(steps=2)
    c.model.preset = preset
    c.eval.max_docs = 4
    c.eval.length_multiples = (1, 2)
    workdir = str(tmp_path / preset)
    train_lib.train(c, workdir, devices=jax.devices()[:1])
    runs.append(workdir)
  # Evaluation builds the saved config's mesh (fsdp = -1: all 8 devices here), so this also
  # restores checkpoints written on one device onto eight.
  out = str(tmp_path / "compare")
  assert eval_main(runs + ["--out", out]) == 0
  for workdir in runs:
    result = json.load(open(os.path.join(workdir, "eval", evaluate.RESULT_FILE)))
    curve = np.asarray(result["loss_by_position"])
    assert curve.shape == (64,) and np.all(np.isfinite(curve)) and np.all(curve > 0)
    assert result["train_length"] == 32 and result["eval_length"] == 64
    assert np.isfinite(result["val_loss"]) and result["num_docs"] == 4
    assert result["loss_early"] == pytest.approx(curve[:4].mean())
    assert result["loss_beyond"] == pytest.approx(curve[32:].mean())
    assert os.path.getsize(os.path.join(workdir, "eval", evaluate.PLOT_FILE)) > 5000
  png = open(os.path.join(out, "comparison.png"), "rb").read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  report = open(os.path.join(out, "report.md")).read()
  assert "fox_pro_tiny" in report and "transformer_pro_tiny" in report
  assert report.count("\n| ") == 3  # header and one row per run


def test_report_gives_each_run_its_own_positions_when_lengths_differ():
  def result(label, T, L):
    return {"label": label, "step": 1, "val_loss": 1.0, "loss_early": 2.0, "loss_late": 3.0,
            "loss_beyond": 4.0, "train_length": T, "eval_length": L, "num_docs": 4}
  report = evaluate.report_markdown([result("short", 32, 128), result("long", 64, 256)])
  rows = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| ")}
  assert "pos 1-4, pos 29-32, pos 97-128" in rows["short"]
  assert "pos 1-8, pos 57-64, pos 193-256" in rows["long"]
  same = evaluate.report_markdown([result("a", 32, 128), result("b", 32, 128)])
  assert "early (pos 1-4) | late (pos 29-32) | beyond (pos 97-128)" in same

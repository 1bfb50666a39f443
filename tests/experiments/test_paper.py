"""Every script of experiments/paper runs end to end at --scale smoke (tiny models, a few
steps), writes its JSON, markdown and PNG, reuses finished runs, and turns a user's mistake
into one line.

The scripts run as a user runs them: subprocesses on one CPU device (without the test
suite's 8 simulated devices), sharing one output directory as the scripts share runs.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = os.path.join(REPO, "experiments", "paper")


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
  r = subprocess.run([sys.executable, os.path.join(PAPER, f"{name}.py"), *args], cwd=REPO,
                     env=_env(), capture_output=True, text=True, timeout=1200)
  if check:
    assert r.returncode == 0, (name, r.stdout[-2000:], r.stderr[-4000:])
  return r


def load(out, stem: str) -> dict:
  for ext in ("md", "png"):
    assert os.path.getsize(os.path.join(out, f"{stem}.{ext}")) > 0, (stem, ext)
  with open(os.path.join(out, f"{stem}.json")) as f:
    result = json.load(f)
  assert result["scale"] == "smoke" and result["provenance"]["jax"]
  return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("paper"))
  smoke = ["--scale", "smoke", "--seeds", "1", "--out", out]
  # gpu_scale runs the ladder (its two Pro models), acp, needle, mqar and throughput; the
  # full ladder then reuses those two runs, and the gate ablation two of the ladder's.
  run("gpu_scale", *smoke)
  run("ladder", *smoke)
  run("gate_ablation", *smoke)
  return out, smoke


def test_every_script_writes_its_results(smoke):
  out, _ = smoke
  ladder = load(out, "ladder_smoke")
  assert [m["family"] for m in ladder["models"]] == ["transformer_llama", "transformer_pro",
                                                      "fox_llama", "fox_pro"]
  for m in ladder["models"]:
    (r,) = m["runs"]
    assert np.isfinite(r["val_loss"]) and len(r["loss"]) == 2 * 64
  ablation = load(out, "gate_ablation_smoke")
  assert len(ablation["cells"]) == 8
  # The shared cells are the ladder's runs, not new ones.
  fox = next(m for m in ladder["models"] if m["family"] == "fox_llama")
  assert ablation["cells"]["full/no_rope"]["runs"][0]["workdir"] == fox["runs"][0]["workdir"]
  acp = load(out, "acp_smoke")
  (pair,) = acp["seeds_results"]
  assert all(0 < x["kept_fraction"] <= 1 for x in pair["lengths"])
  needle = load(out, "needle_smoke")
  for r in needle["results"]:
    assert set(np.ravel(list(r["grid"].values()))) <= {0.0, 1.0}
  load(out, "mqar_smoke")
  throughput = load(out, "throughput_smoke")
  assert all(r["tokens_per_s"] > 0 for r in throughput["results"])


def test_second_invocation_reuses_finished_runs(smoke):
  out, args = smoke
  runs = os.path.join(out, "runs", "smoke")
  before = {d: os.listdir(os.path.join(runs, d, "seed0", "checkpoints")) for d in os.listdir(runs)}
  with open(os.path.join(out, "ladder_smoke.json")) as f:
    first = json.load(f)
  run("ladder", *args)
  with open(os.path.join(out, "ladder_smoke.json")) as f:
    second = json.load(f)
  assert ([r["val_loss"] for m in first["models"] for r in m["runs"]] ==
          [r["val_loss"] for m in second["models"] for r in m["runs"]])
  after = {d: os.listdir(os.path.join(runs, d, "seed0", "checkpoints")) for d in os.listdir(runs)}
  assert after == before


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--tokens", "-5"], "--tokens must be >= 1"),
    (["--families", "fox_pro,gpt"], "--families: unknown ['gpt']"),
    (["--scale", "huge"], "--scale: invalid choice"),
])
def test_bad_flags_are_one_line(tmp_path, args, message):
  r = run("ladder", "--out", str(tmp_path), *args, check=False)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
  assert os.listdir(tmp_path) == []


def test_mqar_refuses_a_corpus(tmp_path):
  """MQAR is synthetic: a --data_path would be silently ignored, so it is an error."""
  r = run("mqar", "--out", str(tmp_path), "--data_path", str(tmp_path), check=False)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "--data_path does not apply" in lines[0]
  assert os.listdir(tmp_path) == []

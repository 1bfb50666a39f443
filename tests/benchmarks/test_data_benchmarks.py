"""Smoke runs of the input-pipeline benchmarks (benchmarks/data.py, benchmarks/data_memory.py)
at tiny sizes, in subprocesses as a user runs them: their markdown tables print."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, *args, timeout=120):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as the scripts run by hand
  done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  return done.stdout


def _table(out, header):
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip("|").split("|")])
  return rows


def test_data_benchmark_prints_its_table(tmp_path):
  out_file = tmp_path / "data.md"
  out = _run("data.py", "--sources", "builtin", "--workers", "0", "--steps", "2", "--warmup",
             "0", "--batch", "4", "--seq_len", "64", "--train-steps", "1", "--out",
             str(out_file))
  assert "# command: python" in out and "# training step:" in out and "commit" in out
  rows = _table(out, "| source | workers |")
  assert len(rows) == 1 and rows[0][:2] == ["builtin", "0"], rows
  tokens_s, ratio = float(rows[0][5].replace(",", "")), float(rows[0][8].replace(",", ""))
  assert tokens_s > 0 and ratio > 0
  assert out_file.read_text().strip() == out.strip()


def test_data_memory_benchmark_prints_its_table(tmp_path):
  out = _run("data_memory.py", "--gb", "0.01", "--read-gb", "0.002", "--batch", "4",
             "--seq_len", "1024", "--every", "20", "--dir", str(tmp_path))
  rows = _table(out, "| batch | consumed GB |")
  assert len(rows) >= 2 and rows[0][0] == "0", rows
  assert float(rows[-1][1]) >= 0.002 and float(rows[-1][3]) > 0
  assert "RSS max - min" in out
  assert os.listdir(tmp_path) == []  # the corpus is deleted

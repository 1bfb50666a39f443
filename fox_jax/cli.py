"""Console entry points ``fox-train`` and ``fox-eval``.

  fox-train --config experiments/configs/fox_pro_tiny.py --workdir runs/fox \
      --config.optim.peak_lr=1e-3
  fox-train --workdir runs/fox          # resume with the config saved in the run directory
  fox-train ... --distributed           # one process per host (TPU pod, SLURM, Kubernetes)
  fox-train ... --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0   # by hand
  fox-eval runs/fox runs/transformer --out runs/compare
"""

from __future__ import annotations

import argparse
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file (get_config()); fields overridable as --config.a.b=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps (resumable).")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Join the other processes of a multi-host run with "
    "jax.distributed.initialize (detected on TPU pods, SLURM, Kubernetes; implied by "
    "--coordinator).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0's coordinator, for hand-launched runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0 .. N - 1.")


def _train(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax reports every save at INFO; the progress bar and metrics.jsonl say enough.
  logging.set_verbosity(logging.WARNING)
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise app.UsageError("--coordinator, --num_processes and --process_id go together")
  from fox_jax import multihost
  # Before anything asks for devices: afterwards the backend is fixed to this process alone.
  if _DISTRIBUTED.value or _COORDINATOR.value is not None:
    multihost.initialize(*explicit)
  from fox_jax import train as train_lib
  workdir = _WORKDIR.value
  if workdir is None:
    raise app.UsageError("--workdir is required")
  config = _CONFIG.value
  if config is None:
    if not os.path.exists(os.path.join(workdir, "config.json")):
      raise app.UsageError(f"--config is required: {workdir} holds no saved config")
    config = train_lib.load_config(workdir)
  try:
    result = train_lib.train(config, workdir, max_steps=_MAX_STEPS.value)
  except train_lib.NonFiniteError as e:
    print(f"fox-train: {e}", file=sys.stderr)
    return 1
  msg = (f"stopped by SIGTERM at step {result.step}; checkpoint saved, rerun to resume"
         if result.status == "preempted" else f"finished at step {result.step}")
  if result.val_loss is not None:
    msg += f"; validation loss {result.val_loss:.4f}"
  if multihost.is_main():
    print(f"fox-train: {msg}")
  return 0


def train_main():
  app.run(_train)


def eval_main(argv=None):
  parser = argparse.ArgumentParser(
      prog="fox-eval", description="Loss against position (and beyond the training length) "
      "and validation loss of one or more run directories, plotted together.")
  parser.add_argument("runs", nargs="+", help="run directories written by fox-train")
  parser.add_argument("--out", default=None,
                      help="directory for comparison.png, comparison.json and report.md "
                      "(default: the first run's eval directory)")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  from fox_jax import evaluate
  out = args.out or os.path.join(args.runs[0], "eval")
  results = evaluate.compare(args.runs, out)
  print(evaluate.report_markdown(results))
  print(f"fox-eval: wrote {os.path.join(out, 'comparison.png')} and {os.path.join(out, 'report.md')}")
  return 0

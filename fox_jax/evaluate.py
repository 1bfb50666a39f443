"""Evaluation: validation loss and per-token loss against position, with plots and a report.

Loss against position follows the FoX paper's protocol on a small scale: held-out
documents at least L tokens long are read from their start (unpacked), the loss at each
position 0..L-1 is averaged over documents, and L goes past the training length to show
length extrapolation. Curves are smoothed with a centred moving average for plotting.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fox_jax import checkpoint as ckpt_lib
from fox_jax import rundir
from fox_jax import sharding
from fox_jax import train as train_lib
from fox_jax.data import Batch, PackedDataset, contiguous_windows, corpus_from_config
from fox_jax.errors import UsageError

RESULT_FILE = "per_token_loss.json"
PLOT_FILE = "per_token_loss.png"


def per_token_loss(eval_fn, params, windows: Batch, batch_size: int) -> np.ndarray:
  """Mean loss at each position [L] over the rows of ``windows`` [N, L]."""
  total = np.zeros(windows.inputs.shape[1], np.float64)
  for start in range(0, windows.inputs.shape[0], batch_size):
    b = Batch(*(jnp.asarray(x[start:start + batch_size]) for x in windows))
    total += np.asarray(eval_fn(params, b), np.float64).sum(axis=0)
  return total / windows.inputs.shape[0]


def smooth(x: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average over ``window`` points, narrower near the ends.

  At index i the half-width is min(window // 2, i // 2): the first positions, which a
  log-scaled axis spreads out and where loss changes fastest, are barely averaged.
  """
  x = np.asarray(x, np.float64)
  csum = np.concatenate([[0.0], np.cumsum(x)])
  idx = np.arange(len(x))
  half = np.minimum(max(int(window), 1) // 2, idx // 2)
  lo, hi = idx - half, np.minimum(idx + half + 1, len(x))
  return (csum[hi] - csum[lo]) / (hi - lo)


def _report_broken(broken: ckpt_lib.BrokenCheckpoint) -> None:
  print(f"fox-eval: checkpoint step {broken.step} cannot be restored ({broken.reason}); "
        f"left in place, evaluating an older one", file=sys.stderr, flush=True)


def restore_params(workdir: str, setup, *, step: Optional[int] = None,
                   on_broken: Callable[[ckpt_lib.BrokenCheckpoint], None] = _report_broken):
  """(step, params) of a run's checkpoint: ``step``, or the newest that restores.

  Reads only: creates nothing in the run directory and moves no broken checkpoint.
  """
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise UsageError(f"{workdir} holds no checkpoint to evaluate")
    if step is None:
      restored, broken = checkpointer.restore_latest(setup.abstract_state)
      for b in broken:
        on_broken(b)
      return restored.step, restored.state["params"]
    if step not in steps:
      raise UsageError(f"{workdir} has no checkpoint at step {step} (it has {steps})")
    try:
      state, _ = checkpointer.restore(step, setup.abstract_state)
    except ckpt_lib.BrokenCheckpoint as e:
      raise UsageError(str(e)) from None
    return step, state["params"]
  finally:
    checkpointer.close()


def evaluate_run(workdir: str, *, step: Optional[int] = None, write: bool = True,
                 devices=None) -> dict:
  """Evaluates a run's checkpoint (default: the newest that restores); with ``write``,
  writes ``<run>/eval/*.json|png`` (:func:`write_result`).

  On the run's mesh when ``devices`` (default: all) can hold it; otherwise (a run trained
  on more devices, e.g. with context parallelism) with FSDP over ``devices``: the losses do
  not depend on the mesh.
  """
  c = rundir.load_config(workdir)
  devices = list(jax.devices() if devices is None else devices)
  try:
    sharding.mesh_shape(c.mesh.to_dict(), len(devices))
  except ValueError:
    print(f"fox-eval: {workdir}: its mesh {c.mesh.to_dict()} does not fit the "
          f"{len(devices)} device(s) here; evaluating with FSDP over them", file=sys.stderr)
    c.mesh.update({"data": 1, "fsdp": -1, "context": 1, "tensor": 1})
  setup = train_lib.build(c, devices)
  step, params = restore_params(workdir, setup, step=step)
  eval_fn = setup.eval_fn
  try:
    corpus = corpus_from_config(c.data, "heldout")
  except (ValueError, OSError) as e:
    raise UsageError(f"{rundir.config_path(workdir)}: data.path: {e}") from None
  state = {"params": params}
  heldout = PackedDataset(corpus, c.data.seq_len, c.data.seed)
  val = train_lib.validation_loss(setup, eval_fn, state["params"], heldout, c.run.val_rows,
                                  c.eval.batch_size)
  T = int(c.data.seq_len)
  length = T * max(c.eval.length_multiples)
  try:
    windows = contiguous_windows(corpus, length, c.eval.max_docs)
  except ValueError as e:
    raise UsageError(f"{workdir}: eval.length_multiples {tuple(c.eval.length_multiples)} x "
                     f"seq_len {T} is too long for the held-out documents ({e})") from None
  curve = per_token_loss(eval_fn, state["params"], windows, c.eval.batch_size)
  result = {
      "run": os.path.abspath(workdir), "label": run_label(c, workdir), "step": int(step),
      "train_length": T, "eval_length": length, "num_docs": int(windows.inputs.shape[0]),
      "val_loss": val, "loss_by_position": curve.tolist(), "smooth": int(c.eval.smooth),
      **summary(curve, T)}
  if write:
    write_result(result)
  return result


def write_result(result: dict) -> None:
  """``<run>/eval/per_token_loss.{json,png}`` of one run's result."""
  out = os.path.join(result["run"], "eval")
  _make_output_dir(out)
  with open(os.path.join(out, RESULT_FILE), "w") as f:
    json.dump(result, f, indent=1)
  plot([result], os.path.join(out, PLOT_FILE))


def check_output_dir(path: str) -> None:
  """UsageError unless ``path`` is a writable directory or can be created as one (creates
  nothing, so that a failed evaluation leaves nothing behind)."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UsageError(f"cannot create output directory {path}: {probe} is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UsageError(f"output directory {path} is not writable ({probe})")


def _make_output_dir(path: str) -> None:
  check_output_dir(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UsageError(f"cannot create output directory {path}: {e.strerror}") from None


def run_label(c, workdir: str) -> str:
  return f"{os.path.basename(os.path.normpath(workdir))} ({c.model.preset})"


def summary(curve: np.ndarray, train_length: int) -> dict:
  """Mean loss over early (first 1/8) and late (last 1/8) positions of the training length,
  and over the last training length's worth of positions beyond it, if evaluated."""
  T = train_length
  w = max(1, T // 8)
  out = {"loss_early": float(np.mean(curve[:w])), "loss_late": float(np.mean(curve[T - w:T]))}
  if len(curve) > T:
    out["loss_beyond"] = float(np.mean(curve[max(T, len(curve) - T):]))
  return out


def load_result(workdir: str) -> dict:
  with open(os.path.join(workdir, "eval", RESULT_FILE)) as f:
    return json.load(f)


def plot(results: Sequence[dict], path: str) -> None:
  """Smoothed loss against position of one or more runs; a line marks the training length."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  for r in results:
    curve = np.asarray(r["loss_by_position"])
    ax.plot(np.arange(1, len(curve) + 1), smooth(curve, r["smooth"]), label=r["label"])
  train_lengths = sorted({r["train_length"] for r in results})
  for T in train_lengths:
    ax.axvline(T, color="grey", linestyle="--", linewidth=1)
  ax.set_xscale("log")
  ax.set_xlabel("token position (dashed: training length)")
  ax.set_ylabel("loss (nats / byte)")
  smooth_w = sorted({r["smooth"] for r in results})
  ax.set_title(f"Held-out loss vs position (moving average over up to {smooth_w[0]} tokens)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def report_markdown(results: Sequence[dict]) -> str:
  """A markdown table of validation loss and loss at early / late / extrapolated positions.

  Positions are each run's own: early = the first T/8, late = the last T/8 of its training
  length T, beyond = its last T evaluated positions; when the runs share T and the
  evaluated length the header gives the positions, otherwise each row does.
  """
  lengths = {(r["train_length"], r["eval_length"]) for r in results}
  shared = len(lengths) == 1
  beyond = any(r["eval_length"] > r["train_length"] for r in results)

  def spans(r):
    T, L = r["train_length"], r["eval_length"]
    w = max(1, T // 8)
    out = [f"pos 1-{w}", f"pos {T - w + 1}-{T}"]
    if L > T:
      out.append(f"pos {max(T, L - T) + 1}-{L}")
    return out

  if shared:
    T, L = next(iter(lengths))
    intro = (f"Held-out loss (nats per byte). Training length T = {T}; loss against position "
             f"over {results[0]['num_docs']} held-out documents read from their start, up to "
             f"{L} tokens.")
    names = spans(results[0])
    header = (f"| run | step | validation loss | early ({names[0]}) | late ({names[1]}) |"
              + (f" beyond ({names[2]}) |" if beyond else ""))
  else:
    intro = ("Held-out loss (nats per byte). The runs differ in training length T: early is "
             "the first T/8 positions, late the last T/8 up to T, beyond the last T "
             "positions evaluated, each of its own run (the positions column).")
    header = ("| run | step | validation loss | early | late |" + (" beyond |" if beyond else "")
              + " positions |")
  cols = header.count("|") - 1
  lines = [intro, "", header, "|" + "---|" * cols]
  for r in results:
    row = (f"| {r['label']} | {r['step']} | {r['val_loss']:.4f} | {r['loss_early']:.4f} | "
           f"{r['loss_late']:.4f} |")
    if beyond:
      row += f" {r.get('loss_beyond', float('nan')):.4f} |"
    if not shared:
      row += f" {', '.join(spans(r))} |"
    lines.append(row)
  return "\n".join(lines) + "\n"


def compare(run_dirs: Sequence[str], out_dir: str, *, evaluate: bool = True,
            step: Optional[int] = None) -> list[dict]:
  """Evaluates each run (or reads its saved result) and writes one plot and one report."""
  for d in run_dirs:
    rundir.load_config(d)  # a missing or foreign directory is named before anything runs
    check_output_dir(os.path.join(d, "eval"))
  check_output_dir(out_dir)
  # Every run is evaluated before anything is written: a failure leaves earlier results be.
  results = [evaluate_run(d, step=step, write=False) if evaluate else load_result(d)
             for d in run_dirs]
  if evaluate:
    for r in results:
      write_result(r)
  _make_output_dir(out_dir)
  plot(results, os.path.join(out_dir, "comparison.png"))
  with open(os.path.join(out_dir, "comparison.json"), "w") as f:
    json.dump([{k: v for k, v in r.items() if k != "loss_by_position"} for r in results], f,
              indent=1)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write("# Loss comparison\n\n")
    f.write(report_markdown(results))
    f.write("\n![loss vs position](comparison.png)\n")
  return results

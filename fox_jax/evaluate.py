"""Evaluation of run directories: the front end of the ``fox_jax.evals`` registry.

:func:`evaluate_run` / :func:`compare` give validation loss and per-token loss against
position (``fox_jax.evals.per_token_loss``: held-out documents read from their start, past
the training length to show length extrapolation) with the run's own mesh, plots and a
report; :func:`run_task` runs any registered evaluation (``needle``, ``passkey``, ...) on a
run's checkpoint and writes ``<name>.json|png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fox_jax import checkpoint as ckpt_lib
from fox_jax import evals
from fox_jax.evals import common as evals_common
from fox_jax import context as context_lib
from fox_jax import loading
from fox_jax import rundir
from fox_jax import train as train_lib
from fox_jax.data import corpus_from_config, datasets
from fox_jax.data.packing import check_token_ids
from fox_jax.errors import UsageError
from fox_jax.evals.per_token_loss import loss_by_position, smooth, summary
from fox_jax.evals.per_token_loss import plot_results as plot

RESULT_FILE = "per_token_loss.json"
PLOT_FILE = "per_token_loss.png"

__all__ = ["smooth", "summary", "plot", "per_token_loss", "evaluate_run", "compare",
           "run_task", "report_markdown", "restore_params", "write_result", "load_result"]


def per_token_loss(eval_fn, params, windows, batch_size: int) -> np.ndarray:
  """Mean loss at each position [L] over the rows of ``windows`` [N, L]."""
  return loss_by_position(lambda b: eval_fn(params, b), windows, batch_size)


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


def _setup(c, workdir: str, devices):
  return loading.run_setup(c, workdir, devices)


def _check_text(c, workdir: str, task: str) -> None:
  """UsageError unless the run trained on text: ``task`` reads its held-out documents."""
  if not datasets.source(c.data).text:
    if c.data.source in evals.EVALS:
      hint = f" (evaluate it with --task {c.data.source})"
    elif datasets.source(c.data).documents:
      hint = " (its documents' loss against position: --task per_token_loss)"
    else:
      hint = ""
    raise UsageError(f"--task {task} reads held-out text, and {workdir} trained on "
                     f"data.source {c.data.source!r}, which has none{hint}")


# Tasks that write their prompts as text, through the run's tokenizer.
_TEXT_PROMPT_TASKS = ("passkey", "lm_eval")


def _check_prompt_tokenizer(c, workdir: str, task: str) -> None:
  """UsageError unless the run's tokenizer is the one its ids came from: a run trained on
  token ids (array_record, longcrawl64, a synthetic task) without ``data.tokenizer`` has
  none, and the byte tokenizer's ids would mean other tokens to its model."""
  if datasets.source(c.data).text or datasets.tokenizer_spec(c.data) != "bytes":
    return
  raise UsageError(f"--task {task} writes text prompts, and {workdir} trained on the token "
                   f"ids of data.source {c.data.source!r} without naming their tokenizer "
                   f"(data.tokenizer in {rundir.config_path(workdir)}); the byte tokenizer's "
                   f"ids are not the ones it was trained on")


def _heldout(c, workdir: str):
  try:
    return corpus_from_config(c.data, "heldout")
  except (ValueError, OSError) as e:
    raise UsageError(f"{rundir.config_path(workdir)}: data.path: {e}") from None


def evaluate_run(workdir: str, *, step: Optional[int] = None, write: bool = True,
                 devices=None, lengths: Optional[Sequence] = None) -> dict:
  """Evaluates a run's checkpoint (default: the newest that restores); with ``write``,
  writes ``<run>/eval/*.json|png`` (:func:`write_result`).

  Loss against position up to the longest of ``lengths`` (tokens, or 'Mx' for M times
  seq_len; default: seq_len x max(eval.length_multiples)). On the run's mesh when ``devices`` (default: all) can hold
  it; otherwise with FSDP over ``devices``: the losses do not depend on the mesh.
  """
  c = rundir.load_config(workdir)
  if not datasets.source(c.data).documents:
    _check_text(c, workdir, "per_token_loss")
  devices = list(jax.devices() if devices is None else devices)
  T = int(c.data.seq_len)
  if lengths is not None:
    length = max(evals_common.parse_lengths(lengths, T, ()))
    what = f"length {length}"
    if length < T:
      raise UsageError(f"--lengths: the loss against position needs a length of at least the "
                       f"training length {T} (it compares early, late and beyond), got {length}")
  else:
    length = T * max(c.eval.length_multiples)
    what = f"eval.length_multiples {tuple(c.eval.length_multiples)} x seq_len {T}"
  setup = _setup(c, workdir, devices)
  _check_length(setup, length, what)
  step, params = restore_params(workdir, setup, step=step)
  eval_fn = setup.eval_fn
  corpus = _heldout(c, workdir)
  try:
    heldout = datasets.heldout_rows(c.data, c.run.val_rows)
    check_token_ids(heldout.rows(0, int(c.run.val_rows)), setup.model_cfg.vocab_size,
                    "a held-out row")
    check_token_ids(corpus.tokens, setup.model_cfg.vocab_size, "a held-out document")
  except (ValueError, OSError) as e:
    raise UsageError(f"{rundir.config_path(workdir)}: config.data: {e}") from None
  tokenizer = loading.run_tokenizer(c, workdir)
  val = train_lib.validation_loss(setup, eval_fn, params, heldout, c.run.val_rows,
                                  c.eval.batch_size)
  task = evals.get("per_token_loss")
  options = task.Options(train_length=T, lengths=(length,), max_docs=c.eval.max_docs,
                         batch_size=c.eval.batch_size, smooth=c.eval.smooth, corpus=corpus)
  try:
    curve = task.run(None, tokenizer, options, loss_fn=lambda b: eval_fn(params, b))
  except ValueError as e:
    raise UsageError(f"{workdir}: {what} is too long for the held-out documents ({e})"
                     ) from None
  unit = ("nats per byte" if datasets.source(c.data).text and tokenizer.name == "bytes"
          else "nats per token")
  result = {"run": os.path.abspath(workdir), "label": run_label(c, workdir), "step": int(step),
            "val_loss": val, "unit": unit, **curve}
  if write:
    write_result(result)
  return result


def check_run(workdir: str, step: Optional[int] = None) -> None:
  """UsageError unless ``workdir`` is a run directory with a checkpoint (at ``step``) or a
  fox-convert checkpoint (which has no steps)."""
  if loading.kind(workdir) == "converted":
    if step is not None:
      raise UsageError(f"{workdir} is a fox-convert checkpoint, which has no steps; drop --step")
    return
  rundir.load_config(workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    steps = checkpointer.all_steps()
  finally:
    checkpointer.close()
  if not steps:
    raise UsageError(f"{workdir} holds no checkpoint to evaluate")
  if step is not None and step not in steps:
    raise UsageError(f"{workdir} has no checkpoint at step {step} (it has {steps})")


def _check_length(setup, length: int, what: str) -> None:
  """UsageError naming ``what`` when the model cannot run rows of ``length`` tokens on this
  setup's mesh (its context-parallel layout, or ``seq_chunk`` x the context size)."""
  P = setup.mesh.shape["context"]
  cfg = setup.model_cfg
  try:
    context_lib.check(cfg, P, length)
  except ValueError as e:
    raise UsageError(f"{what}: {e}") from None
  if cfg.seq_chunk and length % (cfg.seq_chunk * P):
    raise UsageError(f"{what}: must be a multiple of the run's seq_chunk ({cfg.seq_chunk}) x "
                     f"its context size ({P})")


def _load_model(workdir: str, step: Optional[int], devices=None):
  """(config, step, DecoderLM) of a run's checkpoint (``loading.load_model``), its
  parameters gathered onto one device (decoding runs unsharded)."""
  loaded = loading.load_model(workdir, step=step, devices=devices, on_broken=_report_broken)
  graphdef, state = nnx.split(loaded.model)
  # Uncommitted arrays on the default device: jit places them, and a model built anew
  # with the same config shares compiled decoding with this one.
  state = jax.tree.map(jnp.asarray, jax.device_get(state))
  return rundir.load_config(workdir), loaded.step, nnx.merge(graphdef, state)


def run_task(task: str, workdir: str, *, step: Optional[int] = None,
             out: Optional[str] = None, devices=None, train_length: Optional[int] = None,
             **options) -> dict:
  """Runs the registered evaluation ``task`` on a run's checkpoint (default: the newest
  that restores) or on a fox-convert checkpoint, and writes ``<out>/<task>.json|png``
  (default out: ``<path>/eval``).

  ``options`` are fields of the task's ``Options`` (e.g. lengths, depths); those not given
  take the run's (a task's ``run_defaults(config)``, e.g. the MQAR shape a run trained on)
  or the task's defaults. ``train_length`` is the run's seq_len; a converted checkpoint
  records none, so it is given (``--train_length``). The corpus is a run's held-out split,
  the built-in one for a converted checkpoint (tokenised by its own tokenizer). A
  UsageError for an unknown task or a field the task does not have.
  """
  module = evals.get(task)
  fields = {f.name for f in dataclasses.fields(module.Options)} - {"train_length", "corpus"}
  unknown = sorted(k for k, v in options.items() if v is not None and k not in fields)
  if unknown:
    raise UsageError(f"task {task} takes no {', '.join(unknown)} (it takes: "
                     f"{', '.join(sorted(fields))})")
  options = {k: v for k, v in options.items() if v is not None}
  takes_corpus = "corpus" in {f.name for f in dataclasses.fields(module.Options)}
  converted = loading.kind(workdir) == "converted"
  if converted:
    if task == "per_token_loss":
      raise UsageError(f"{workdir} is a fox-convert checkpoint: --task per_token_loss reads a "
                       f"run's held-out split (evaluate the checkpoint with another task)")
    if train_length is None:
      raise UsageError(f"{workdir} is a fox-convert checkpoint, which records no training "
                       f"length: give --train_length (the length it was trained at)")
    if not isinstance(train_length, int) or train_length < 1:
      raise UsageError(f"--train_length must be >= 1, got {train_length}")
    c, T = None, int(train_length)
  else:
    c = rundir.load_config(workdir)
    T = int(c.data.seq_len)
    if train_length is not None and train_length != T:
      raise UsageError(f"--train_length {train_length}: {workdir} was trained at {T} (its "
                       f"config's data.seq_len); drop the flag")
    if takes_corpus:
      _check_text(c, workdir, task)
    elif task in _TEXT_PROMPT_TASKS:
      _check_prompt_tokenizer(c, workdir, task)
    if hasattr(module, "run_defaults"):
      options = {**module.run_defaults(c), **options}
  opts = module.Options(train_length=T, **options)  # checked before loading
  out = out or os.path.join(workdir, "eval")
  check_output_dir(out)
  if converted:
    loaded = loading.load_model(workdir)
    model, tok, step = loaded.model, loaded.tokenizer, None
    label = f"{os.path.basename(os.path.normpath(workdir))} (converted)"
  else:
    c, step, model = _load_model(workdir, step, devices)
    tok, label = loading.run_tokenizer(c, workdir), run_label(c, workdir)
    if takes_corpus:
      opts.corpus = _heldout(c, workdir)
  result = module.run(model, tok, opts)
  result = {"run": os.path.abspath(workdir), "label": label,
            "step": None if step is None else int(step), **result}
  _make_output_dir(out)
  evals.write(task, result, out)
  return result


def write_result(result: dict) -> None:
  """``<run>/eval/per_token_loss.{json,png}`` of one run's result."""
  out = os.path.join(result["run"], "eval")
  _make_output_dir(out)
  evals.write("per_token_loss", result, out)


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


def load_result(workdir: str) -> dict:
  with open(os.path.join(workdir, "eval", RESULT_FILE)) as f:
    return json.load(f)


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

  units = sorted({r.get("unit", "nats per byte") for r in results})
  unit = units[0] if len(units) == 1 else "nats per token; " + ", ".join(
      f"{r['label']}: {r.get('unit', 'nats per byte')}" for r in results)
  if shared:
    T, L = next(iter(lengths))
    intro = (f"Held-out loss ({unit}). Training length T = {T}; loss against position "
             f"over {results[0]['num_docs']} held-out documents read from their start, up to "
             f"{L} tokens.")
    names = spans(results[0])
    header = (f"| run | step | validation loss | early ({names[0]}) | late ({names[1]}) |"
              + (f" beyond ({names[2]}) |" if beyond else ""))
  else:
    intro = (f"Held-out loss ({unit}). The runs differ in training length T: early is "
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
            step: Optional[int] = None, lengths: Optional[Sequence] = None) -> list[dict]:
  """Evaluates each run (or reads its saved result) and writes one plot and one report;
  ``lengths``: as for :func:`evaluate_run`."""
  for d in run_dirs:
    rundir.load_config(d)  # a missing or foreign directory is named before anything runs
    check_output_dir(os.path.join(d, "eval"))
  check_output_dir(out_dir)
  # Every run is evaluated before anything is written: a failure leaves earlier results be.
  results = [evaluate_run(d, step=step, write=False, lengths=lengths) if evaluate else load_result(d)
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

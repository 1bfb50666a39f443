"""lm-evaluation-harness tasks (lm_eval 0.4.13) on a fox-jax model: the ``lm_eval`` evaluation.

``run(model, tokenizer, options)`` wraps the model in ``harness_lm.FoxLM`` (BOS first,
``max_length`` tokens at a time, ``batch_size`` rows per forward pass; see there) and runs
``lm_eval.simple_evaluate`` zero-shot on ``options.lm_eval_tasks``, as the FoX authors did
(their list: ``AUTHORS_TASKS``). Built-in tasks download their data sets from the Hugging
Face Hub; ``lm_eval_include_path`` adds task YAMLs of one's own, e.g. over a local JSONL
(``dataset_path: json``, ``dataset_kwargs: {data_files: {test: /abs/file.jsonl}}``).

The result holds lm_eval's per-task metrics (``results``) and one headline score per task
(``scores``: the metric of the authors' table for their tasks, acc_norm for ARC-challenge,
HellaSwag and OpenBookQA, word perplexity for WikiText, acc otherwise). ``plot`` draws
those scores as bars: accuracies on [0, 1], perplexities on a log axis.

``lm_eval`` is imported only when an evaluation runs: without it, a one-line UsageError
names the ``lm-eval`` extra. ``fox-lm-eval`` (``fox_jax.cli.lm_eval_main``) is lm_eval's own command
line with the ``fox`` model registered: ``fox-lm-eval --model fox --model_args path=DIR
--tasks piqa``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import numpy as np

from fox_jax.errors import UsageError
from fox_jax.evals import common

# The FoX paper's lm_eval tasks, and the metric its table reports for each.
AUTHORS_TASKS = ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy",
                 "arc_challenge", "boolq", "sciq", "copa", "openbookqa")
HEADLINE = {"wikitext": "word_perplexity", "arc_challenge": "acc_norm",
            "hellaswag": "acc_norm", "openbookqa": "acc_norm"}
# Metrics where lower is better, drawn on a log axis.
PERPLEXITIES = ("word_perplexity", "byte_perplexity", "perplexity")


@dataclasses.dataclass
class Options:
  train_length: int
  lm_eval_tasks: Sequence[str] = ()  # lm_eval task (or group) names
  lm_eval_include_path: Optional[str] = None  # a directory (or file) of task YAMLs
  limit: Optional[float] = None  # examples per task: a count, or a fraction < 1
  batch_size: int = 16
  max_length: Optional[int] = None  # default: train_length
  num_fewshot: int = 0
  bootstrap_iters: int = 100000  # lm_eval's default, for the stderr of non-mean metrics

  def __post_init__(self):
    if isinstance(self.lm_eval_tasks, str):
      self.lm_eval_tasks = self.lm_eval_tasks.split(",")
    self.lm_eval_tasks = tuple(t.strip() for t in self.lm_eval_tasks if t.strip())
    if not self.lm_eval_tasks:
      raise UsageError("lm_eval needs task names (--lm_eval_tasks piqa,hellaswag,...; the "
                       f"FoX authors': {','.join(AUTHORS_TASKS)})")
    if self.lm_eval_include_path is not None:
      if not os.path.exists(self.lm_eval_include_path):
        raise UsageError(f"--lm_eval_include_path {self.lm_eval_include_path} does not exist")
      self.lm_eval_include_path = os.path.abspath(self.lm_eval_include_path)
    if self.limit is not None:
      limit = float(self.limit)
      if not math.isfinite(limit) or limit <= 0 or (limit >= 1 and limit != int(limit)):
        raise UsageError(f"--limit must be a whole number of examples or a fraction in "
                         f"(0, 1), got {self.limit}")
      self.limit = int(limit) if limit >= 1 else limit
    if self.max_length is None:
      self.max_length = self.train_length
    for name, lo in (("batch_size", 1), ("max_length", 2), ("num_fewshot", 0),
                     ("bootstrap_iters", 0)):
      if int(getattr(self, name)) < lo:
        raise UsageError(f"lm_eval {name} must be >= {lo}, got {getattr(self, name)}")


def require_lm_eval():
  """The ``harness_lm`` module (imports lm_eval and registers the ``fox`` model); a one-line
  UsageError naming the lm-eval extra without lm_eval."""
  import importlib
  return importlib.import_module("fox_jax.evals.harness_lm")


def load(path: str, step: Optional[int] = None):
  """(model on the default device, tokenizer, training length or None) of a run directory
  or a fox-convert checkpoint (``fox_jax.loading.load_model``)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from fox_jax import loading, rundir
  loaded = loading.load_model(path, step=step)
  graphdef, state = nnx.split(loaded.model)
  # Gathered and uncommitted, as fox-eval's other tasks: jit places them on one device.
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, jax.device_get(state)))
  train_length = int(rundir.load_config(path).data.seq_len) if loaded.source == "run" else None
  return model, loaded.tokenizer, train_length


def task_manager(tasks: Sequence[str], include_path: Optional[str]):
  """lm_eval's TaskManager for ``tasks``: over ``include_path`` alone when every name is a
  plain task there (indexing lm_eval's own ~15k task YAMLs takes seconds), else over both.
  A one-line UsageError naming the tasks neither knows."""
  from lm_eval.tasks import TaskManager
  if include_path is not None:
    local = TaskManager(include_path=include_path, include_defaults=False)
    if set(tasks) <= set(local.all_subtasks):
      return local
  manager = TaskManager(include_path=include_path)
  unknown = [t for t in tasks if not manager.match_tasks([t])]
  if unknown:
    where = "lm_eval's tasks" + (f" or {include_path}" if include_path else "")
    raise UsageError(f"unknown lm_eval task(s) {', '.join(unknown)} (not in {where}; "
                     f"'lm-eval ls tasks' lists them)")
  return manager


def headline(task: str, metrics: dict) -> Optional[tuple[str, float]]:
  """(metric, value) reported for ``task`` from its lm_eval metrics ('name,filter' keys)."""
  values = {k.split(",")[0]: v for k, v in metrics.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
  for name in (HEADLINE.get(task), "acc", "exact_match", "word_perplexity", *sorted(values)):
    if name in values:
      return name, float(values[name])
  return None


def run(model, tokenizer, options: Options, *, lm=None) -> dict:
  """lm_eval's metrics for ``options.lm_eval_tasks`` (zero-shot by default).

  ``lm`` (default: ``FoxLM(model, tokenizer, ...)`` with the options' max_length and
  batch_size) is any lm_eval model in its place.
  """
  harness_lm = require_lm_eval()
  import lm_eval
  if lm is None:
    lm = harness_lm.FoxLM(model, tokenizer, max_length=options.max_length,
                          batch_size=options.batch_size)
  manager = task_manager(options.lm_eval_tasks, options.lm_eval_include_path)
  try:
    out = lm_eval.simple_evaluate(model=lm, tasks=list(options.lm_eval_tasks),
                                  num_fewshot=options.num_fewshot, limit=options.limit,
                                  task_manager=manager, log_samples=False,
                                  bootstrap_iters=int(options.bootstrap_iters))
  except (ConnectionError, FileNotFoundError) as e:  # a data set that cannot be had
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise UsageError(f"lm_eval could not load a task's data ({detail}); lm_eval's own tasks "
                     f"download from the Hugging Face Hub (network or a filled HF cache), "
                     f"local ones read the files their YAML names") from None
  results = _jsonable(out["results"])
  scores = {}
  for task, metrics in results.items():
    h = headline(task, metrics)
    if h is not None:
      scores[task] = {"metric": h[0], "value": h[1]}
  return {"task": "lm_eval", "options": common.options_dict(options),
          "lm_eval_version": lm_eval.__version__, "scores": scores, "results": results,
          **{k.replace("-", "_"): _jsonable(out.get(k, {}))
             for k in ("n-samples", "versions", "n-shot")}}


def _jsonable(tree):
  """``tree`` with numpy scalars as Python numbers and anything else JSON lacks as text."""
  import json
  default = lambda v: v.item() if isinstance(v, np.generic) else str(v)
  return json.loads(json.dumps(tree, default=default))


def report_line(result: dict) -> str:
  """'task metric value, ...' of a result's headline scores (fox-eval prints it)."""
  return ", ".join(f"{t} {s['metric']} {s['value']:.4g}" for t, s in result["scores"].items())


def plot(result: dict, path: str) -> None:
  """Bars of the headline scores: accuracies (and other scores) on one panel, perplexities
  on a log axis on another."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  scores = result["scores"]
  groups = [[t for t in scores if scores[t]["metric"] not in PERPLEXITIES],
            [t for t in scores if scores[t]["metric"] in PERPLEXITIES]]
  groups = [g for g in groups if g] or [[]]
  fig, axes = plt.subplots(1, len(groups), dpi=120, squeeze=False,
                           figsize=(1.5 + sum(0.6 * max(len(g), 2) for g in groups), 4.2))
  for ax, tasks in zip(axes[0], groups):
    values = [scores[t]["value"] for t in tasks]
    ax.bar(range(len(tasks)), values, color="tab:blue")
    ax.set_xticks(range(len(tasks)), [f"{t}\n{scores[t]['metric']}" for t in tasks],
                  rotation=60, fontsize=7)
    for i, v in enumerate(values):
      ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    if tasks and scores[tasks[0]]["metric"] in PERPLEXITIES:
      ax.set_yscale("log")
      ax.set_ylabel("perplexity (lower is better)")
    else:
      ax.set_ylabel("score")
      if values and all(0 <= v <= 1 for v in values):
        ax.set_ylim(0, 1)
  o = result["options"]
  fig.suptitle(f"lm_eval {result.get('label', '')} ({o['num_fewshot']}-shot, max_length "
               f"{o['max_length']}{', limit ' + str(o['limit']) if o['limit'] else ''})",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)

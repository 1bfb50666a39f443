"""What the paper experiments share: flags, scales, runs, seeds, tables and provenance.

Every script in this directory takes the same flags (:func:`parser`):

  --out DIR        results (DIR/<script>.json, .md, .png) and runs (DIR/runs/<scale>/<run>/
                   seed<s>, with the token budget and corpus in <scale> when given);
                   default runs/paper. Runs are shared between scripts: the needle and ACP
                   experiments reuse the ladder's FoX (Pro) and Transformer (Pro) runs, the
                   gate ablation the ladder's LLaMA ones. A second invocation resumes or
                   reuses them (a finished run is not trained again).
  --seeds N        seeds per cell (each seed changes the initialisation and the data order).
  --scale S        smoke (seconds; what CI runs), cpu (the recorded results: the main
                   command's model and data, 400k tokens), gpu (the 125M presets at 2048
                   tokens, 2^28 tokens per run; see gpu_scale.py).
  --tokens N       training tokens per run instead of the scale's.
  --data_path P    a directory or glob of text files instead of the built-in corpus.

A run is fox-train's: the same code, run directory, checkpoints and evaluations, so any run
can be inspected, resumed or evaluated further with fox-eval.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # run as a script from a checkout without an install
  sys.path.insert(0, REPO)

SCALES = ("smoke", "cpu", "gpu")
FAMILIES = ("transformer_llama", "transformer_pro", "fox_llama", "fox_pro")


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def parser(doc: str, *, seeds: int) -> argparse.ArgumentParser:
  p = _Parser(prog=os.path.basename(sys.argv[0]) or "experiment", description=doc,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/paper", help="results and runs go here")
  p.add_argument("--seeds", type=int, default=seeds, help=f"seeds per cell (default {seeds})")
  p.add_argument("--scale", choices=SCALES, default="cpu")
  p.add_argument("--tokens", type=int, default=None, help="training tokens per run")
  p.add_argument("--data_path", default=None, help="text files (directory or glob)")
  return p


@dataclasses.dataclass
class Experiment:
  """One invocation of a script: where it writes and at which scale."""
  name: str
  out: str
  seeds: tuple[int, ...]
  scale: str
  tokens: Optional[int]
  data_path: Optional[str]

  @classmethod
  def from_args(cls, name: str, args) -> "Experiment":
    from fox_jax.errors import UsageError
    if args.seeds < 1:
      raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.tokens is not None and args.tokens < 1:
      raise UsageError(f"--tokens must be >= 1, got {args.tokens}")
    if args.data_path is not None and not args.data_path:
      raise UsageError("--data_path must not be empty")
    return cls(name, os.path.abspath(args.out), tuple(range(args.seeds)), args.scale,
               args.tokens, args.data_path)

  @property
  def train_length(self) -> int:
    """Row length of the language-modelling runs."""
    return {"smoke": 64, "cpu": 256, "gpu": 2048}[self.scale]

  @property
  def val_rows(self) -> int:
    """Held-out rows of :func:`heldout_loss` (the same rows for every run)."""
    return 8 if self.scale == "smoke" else 256

  def run_dir(self, label: str, seed: int) -> str:
    """<out>/runs/<scale>[-<tokens>tok][-data<hash>]/<label>/seed<s>: a token budget or a
    corpus of its own gets runs of its own, so that one script's --tokens never trains
    further (nor --data_path refuses) the runs another script compares at the default."""
    group = self.scale
    if self.tokens is not None:
      group += f"-{self.tokens}tok"
    if self.data_path is not None:
      import hashlib
      group += "-data" + hashlib.sha256(self.data_path.encode()).hexdigest()[:8]
    return os.path.join(self.out, "runs", group, label, f"seed{seed}")


def run_config(exp: Experiment, family: str, seed: int, *, recipe: str = "lm",
               **model_overrides):
  """The config of one run: ``family`` at the experiment's scale, with ``model_overrides``.

  recipe "lm": language modelling on the corpus (the main command's model at the cpu scale,
  experiments/configs/paper_2k.py's at the gpu scale); "mqar": the MQAR task
  (experiments/configs/cpu_mqar.py at the cpu scale; Zoology's vocabulary 8192 and 16 pairs
  in 256-token rows at the gpu scale).
  """
  from fox_jax import run_config as rc
  if recipe == "mqar":
    c = _mqar_config(exp, family)
  elif exp.scale == "gpu":
    c = rc.load_config_file(os.path.join(REPO, "experiments/configs/paper_2k.py") +
                            f":{family}_125m")
    c.optim.total_tokens = 2**28
    c.optim.warmup_tokens = 2**25
  else:
    c = rc.cpu_demo_config(f"{family}_tiny")
    c.optim.total_tokens = 400_000
    c.optim.warmup_tokens = 40_000
    c.run.checkpoint_every = 1000
  if exp.scale == "smoke" and recipe == "lm":
    c.model.overrides.update({"num_layers": 1, "d_model": 32, "num_heads": 2})
    c.data.seq_len = 64
    c.data.global_batch = 4
    c.optim.total_tokens = 64 * 4 * 3
    c.optim.warmup_tokens = 64 * 4
    c.run.val_rows = 4
    c.eval.max_docs = 4
    c.eval.length_multiples = (1, 2)
  if exp.tokens is not None:
    c.optim.total_tokens = exp.tokens
    c.optim.warmup_tokens = min(c.optim.warmup_tokens, exp.tokens // 10)
  if exp.data_path is not None and recipe == "lm":
    c.data.source = "text"
    c.data.path = exp.data_path
  c.model.overrides.update(model_overrides)
  c.run.seed = seed
  c.data.seed = seed
  c.run.progress_bar = False
  c.run.log_every = 1 if exp.scale == "smoke" else 10
  return c


def _mqar_config(exp: Experiment, family: str):
  from fox_jax import run_config as rc
  c = rc.cpu_mqar_config(f"{family}_tiny")
  if exp.scale == "smoke":
    c.model.overrides.update({"num_layers": 1, "d_model": 32, "num_heads": 2})
    c.data.global_batch = 8
    c.data.mqar_train_examples = 256
    c.data.mqar_test_examples = 32
    c.optim.total_tokens = 3 * 8 * 64
    c.optim.warmup_tokens = 8 * 64
    c.run.eval_every = 0
    c.run.val_rows = 16
  elif exp.scale == "gpu":  # Zoology's figure-2 task at its largest cell, 2 layers d 128
    c.model.overrides.update({"vocab_size": 8192, "d_model": 128})
    c.data.seq_len = 256
    c.data.global_batch = 256
    c.data.mqar_vocab = 8192
    c.data.mqar_num_kv_pairs = 16
    c.data.mqar_train_examples = 100_000
    c.data.mqar_test_examples = 3_000
    c.optim.total_tokens = 32 * 100_000 * 256  # 32 epochs
    c.optim.warmup_tokens = 100 * 256 * 256
    c.run.eval_every = 1000
  return c


def train(exp: Experiment, label: str, c) -> dict:
  """Trains (or resumes, or reuses) one run; its directory, validation loss and metrics."""
  from fox_jax import train as train_lib
  workdir = exp.run_dir(label, int(c.run.seed))
  print(f"[{exp.name}] {label} seed {c.run.seed}: {workdir}", flush=True)
  result = train_lib.train(c, workdir)
  if result.status != "done":  # preempted (SIGTERM / SIGINT): the checkpoint is saved
    raise SystemExit(f"{exp.name}: run {workdir} stopped ({result.signal}); run the script "
                     f"again to resume it")
  return {"workdir": workdir, "val_loss": float(result.val_loss),
          "metrics": read_metrics(workdir)}


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def per_token_loss(workdir: str) -> dict:
  """The run's loss against position up to eval.length_multiples x its length (fox-eval's
  per_token_loss, written under <run>/eval), reused when already computed for its step."""
  from fox_jax import evaluate
  path = os.path.join(workdir, "eval", evaluate.RESULT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("step") == _last_step(workdir):
      return saved
  return evaluate.evaluate_run(workdir)


def heldout_loss(workdir: str, rows: int = 256) -> float:
  """Mean loss over the first ``rows`` packed held-out rows of data seed 0: the same rows for
  every run of one row length and corpus, whatever its seed (a run's own val_loss reads rows
  of its data seed, which would add the sampling of the validation set to the spread)."""
  import jax
  from fox_jax import evaluate, loading, rundir
  from fox_jax import train as train_lib
  from fox_jax.data import PackedDataset
  step = _last_step(workdir)
  path = os.path.join(workdir, "eval", "heldout_loss.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("step") == step and saved.get("rows") == rows:
      return saved["loss"]
  c = rundir.load_config(workdir)
  setup = loading.run_setup(c, workdir, jax.devices())
  _, params = evaluate.restore_params(workdir, setup)
  heldout = PackedDataset(evaluate._heldout(c, workdir), int(c.data.seq_len), 0)
  loss = train_lib.validation_loss(setup, setup.eval_fn, params, heldout, rows,
                                   int(c.eval.batch_size))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"step": step, "rows": rows, "loss": loss}, f)
  return loss


def _last_step(workdir: str) -> Optional[int]:
  steps = [m["step"] for m in read_metrics(workdir) if "step" in m]
  return max(steps) if steps else None


def param_count(c) -> tuple[int, int]:
  """(all parameters, non-embedding parameters as the FoX paper counts them) of a config."""
  from flax import nnx
  from fox_jax import train as train_lib
  from fox_jax.model import DecoderLM, count_params
  cfg = train_lib.model_config(c)
  model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  return count_params(model), count_params(model, exclude_embedding=True)


def band_means(losses: Sequence[float], bands: Sequence[tuple[int, int]]) -> list[float]:
  """Mean loss over each 1-based position band [lo, hi]."""
  x = np.asarray(losses, np.float64)
  return [float(x[lo - 1:hi].mean()) for lo, hi in bands]


def mean_spread(values: Sequence[float], digits: int = 4) -> str:
  """'mean ± sample standard deviation' (the mean alone for one value)."""
  v = np.asarray(values, np.float64)
  if len(v) == 1:
    return f"{v[0]:.{digits}f}"
  return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def provenance(script: str, argv: Optional[Sequence[str]] = None) -> dict:
  """Date, command (``script`` with ``argv``, default the process's arguments), machine,
  JAX version and commit."""
  import jax
  try:
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ""
  device = jax.devices()[0]
  return {
      "date": datetime.date.today().isoformat(),
      "command": " ".join(["python", f"experiments/paper/{script}.py",
                           *(sys.argv[1:] if argv is None else argv)]),
      "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                 f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()})",
      "jax": jax.__version__,
      "commit": commit,
  }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(map(str, header)) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  return "\n".join(lines)


def write(exp: Experiment, result: dict, markdown: str, figure=None,
          argv: Optional[Sequence[str]] = None) -> str:
  """Writes <out>/<name>[_<scale>].json, .md (provenance + table) and .png; the markdown."""
  os.makedirs(exp.out, exist_ok=True)
  stem = os.path.join(exp.out, exp.name if exp.scale == "cpu" else f"{exp.name}_{exp.scale}")
  prov = provenance(exp.name, argv)
  result = {"experiment": exp.name, "scale": exp.scale, "seeds": list(exp.seeds),
            "provenance": prov, **result}
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  md = (f"# {exp.name} ({exp.scale} scale)\n\n"
        f"`{prov['command']}`; {prov['date']}; {prov['machine']}; JAX {prov['jax']}; "
        f"commit {prov['commit']}\n\n{markdown}\n")
  with open(stem + ".md", "w") as f:
    f.write(md)
  if figure is not None:
    figure.savefig(stem + ".png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(figure)
  print(md, flush=True)
  return md


def cli(main) -> None:
  """Runs ``main(argv)`` as a script: a user's mistake (a UsageError) is one line on stderr
  and exit status 2, as with fox-train; a run that had to stop (RunError), status 1."""
  from fox_jax.errors import RunError, UsageError
  prog = os.path.basename(sys.argv[0])
  try:
    main(sys.argv[1:])
  except UsageError as e:
    print(f"{prog}: {e}", file=sys.stderr)
    sys.exit(2)
  except RunError as e:
    print(f"{prog}: {e}", file=sys.stderr)
    sys.exit(1)


def plot_mean_curve(ax, runs: Sequence[dict], label: str, window: int = 21) -> None:
  """The seeds' mean loss against position (``run["loss"]``), smoothed as fox-eval plots
  it (``fox_jax.evals.per_token_loss.smooth``)."""
  from fox_jax.evals.per_token_loss import smooth
  curve = np.mean([r["loss"] for r in runs], axis=0)
  ax.plot(np.arange(1, len(curve) + 1), smooth(curve, window), label=label)


def log_lengths_axis(ax, lengths) -> None:
  """A log-scaled x axis labelled at ``lengths`` only (no minor tick labels)."""
  ax.set_xscale("log")
  ax.set_xticks(list(lengths), [str(x) for x in lengths])
  ax.minorticks_off()


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt

"""Console entry points ``fox-train``, ``fox-eval``, ``fox-generate`` and ``fox-convert``
(argparse, one flag style: --lower_case_with_underscores).

  fox-train --config experiments/configs/cpu_demo.py:fox_pro --workdir runs/fox \
      --config.optim.peak_lr=1e-3 --config.model.overrides.num_kv_heads=2
  fox-train --workdir runs/fox          # resume with the config saved in the run directory
  fox-train ... --distributed           # one process per host (TPU pod, SLURM, Kubernetes)
  fox-train ... --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0   # by hand
  fox-eval runs/fox runs/transformer --out runs/compare
  fox-eval runs/fox --task needle --lengths 1x,2x,4x --depths 0,50,100
  fox-eval runs/fox --task passkey --lengths 512,1024,2048 --step 1000
  fox-eval runs/fox --task lm_eval --lm_eval_tasks piqa,hellaswag --batch_size 16
  fox-eval runs/mqar --task mqar --lengths 1x,2x --num_kv_pairs 4,8,16

A user's mistake (a flag, a config field, a path, a run directory in use or trained with
another config) is one line on stderr and exit code 2, with nothing written; a run that
started and had to stop (a non-finite step, a failed save) is one line and exit code 1,
with what was saved kept. SIGTERM or Ctrl-C saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Optional, Sequence

from fox_jax.errors import RunError, UsageError

_CONFIG_HELP = """\
config fields:
  --config.<block>.<field>=<value> sets any field of the config file (blocks: model, data,
  optim, mesh, run, eval; see fox_jax/run_config.py), parsed as the field's type, e.g.
    --config.optim.peak_lr=1e-3 --config.data.seq_len=512 --config.mesh.tensor=2
    --config.run.keep_checkpoints=5 --config.eval.length_multiples=(1,4,16)
  --config.model.overrides.<field>=<value> sets any field of fox_jax.config.ModelConfig,
  also one the config file does not set:
{model_fields}
  and --config.model.overrides.block_sizes.block_q=64, ...pruning.log_tolerance=-10.

resuming:
  Rerunning a run directory resumes from its newest checkpoint that restores. Fields that
  may change on resume:
{safe}
  Any other change is refused (use a new --workdir).
"""


class _Parser(argparse.ArgumentParser):
  """argparse with one-line errors: 'fox-train: <message> (see fox-train --help)', exit 2."""

  def error(self, message):
    self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _train_parser() -> argparse.ArgumentParser:
  from fox_jax import run_config
  from fox_jax.config import ModelConfig
  import dataclasses
  fields = ", ".join(f.name for f in dataclasses.fields(ModelConfig))
  epilog = _CONFIG_HELP.format(
      model_fields=textwrap.fill(fields, 88, initial_indent="    ", subsequent_indent="    "),
      safe=textwrap.fill(", ".join(run_config.SAFE_ON_RESUME), 88, initial_indent="    ",
                         subsequent_indent="    "))
  p = _Parser(prog="fox-train", formatter_class=argparse.RawDescriptionHelpFormatter,
              description="Train a FoX or Transformer language model into a run directory\n"
              "(config.json, checkpoints/, metrics.jsonl, tensorboard/), or resume one.",
              epilog=epilog)
  p.add_argument("--config", metavar="FILE[:ARG]",
                 help="Python config file whose get_config() (get_config(ARG) with :ARG) "
                 "returns the run's ConfigDict (experiments/configs/*.py, e.g. "
                 "cpu_demo.py:transformer_pro); optional when resuming --workdir")
  p.add_argument("--workdir", metavar="DIR", required=True,
                 help="run directory: created if missing, resumed if it holds checkpoints")
  p.add_argument("--max_steps", type=int, metavar="N",
                 help="stop after step N (with a checkpoint; rerun to go on)")
  p.add_argument("--distributed", action="store_true",
                 help="join the other processes of a multi-host run with "
                 "jax.distributed.initialize (detected on TPU pods, SLURM, Kubernetes)")
  p.add_argument("--coordinator", metavar="HOST:PORT",
                 help="process 0's coordinator address, for hand-launched multi-host runs")
  p.add_argument("--num_processes", type=int, metavar="N", help="processes in the run")
  p.add_argument("--process_id", type=int, metavar="I", help="this process's id, 0 .. N-1")
  return p


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(other arguments, [(dotted key, text)]) of ``--config.a.b=v`` / ``--config.a.b v``."""
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config."):
      key, eq, text = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(args):
          raise UsageError(f"{arg} needs a value ({arg}=VALUE)")
        i += 1
        text = args[i]
      overrides.append((key, text))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _quiet_logs() -> None:
  # Orbax logs every save at INFO and its own failures at ERROR with tracebacks; the
  # progress bar, metrics.jsonl and the one-line reports below say what matters.
  from absl import logging
  logging.set_verbosity(logging.FATAL)



def train_main(argv: Optional[Sequence[str]] = None) -> int:
  """``fox-train``; returns the exit code (the console script exits with it)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  # Before anything slow: a SIGTERM or Ctrl-C from here on ends with a message.
  from fox_jax.signals import Interrupted, StopSignals
  with StopSignals(exit_on_second=True) as signals:
    try:
      code = _train(argv, signals)
    except Interrupted as e:
      print(f"fox-train: stopped by {e.signal_name} during start-up, before any step; "
            f"rerun to start or resume", file=sys.stderr)
      code = 0
    except UsageError as e:
      print(f"fox-train: {e}", file=sys.stderr)
      code = 2
    except RunError as e:
      print(f"fox-train: {e}", file=sys.stderr)
      code = 1
    except KeyboardInterrupt:
      print("fox-train: stopped by a second SIGINT without saving; the checkpoints saved "
            "before it are kept", file=sys.stderr)
      code = 130
  return code


def _train(argv: Sequence[str], signals) -> int:
  parser = _train_parser()
  rest, overrides = split_overrides(argv)
  args = parser.parse_args(rest)
  explicit = (args.coordinator, args.num_processes, args.process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise UsageError("--coordinator, --num_processes and --process_id go together")
  _quiet_logs()
  from fox_jax import config_flags, multihost, run_config, rundir
  # Before anything asks for devices: afterwards the backend is fixed to this process alone.
  if args.distributed or args.coordinator is not None:
    multihost.initialize(*explicit)
  from fox_jax import train as train_lib
  if args.config is not None:
    config = run_config.load_config_file(args.config)
  else:
    if not os.path.exists(rundir.config_path(args.workdir)):
      raise UsageError(f"--config is required: {args.workdir} holds no saved config")
    config = rundir.load_config(args.workdir)
  config_flags.apply_overrides(config, overrides)
  result = train_lib.train(config, args.workdir, max_steps=args.max_steps, signals=signals)
  if result.status == "preempted":
    msg = f"stopped by {result.signal} at step {result.step}; checkpoint saved, rerun to resume"
  elif args.max_steps is not None and result.step > args.max_steps:
    msg = f"the run is already at step {result.step}, past --max_steps {args.max_steps}; nothing done"
  else:
    msg = f"finished at step {result.step}"
  if result.val_loss is not None:
    msg += f"; validation loss {result.val_loss:.4f}"
  if multihost.is_main():
    print(f"fox-train: {msg}")
  return 0


def _csv(kind):
  def parse(text):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
      raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    if kind in (float, int):
      try:
        return [kind(t) for t in items]
      except ValueError:
        what = "integers" if kind is int else "numbers"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    return items
  return parse


def _eval_parser() -> argparse.ArgumentParser:
  from fox_jax.evals import EVALS
  p = _Parser(prog="fox-eval", formatter_class=argparse.RawDescriptionHelpFormatter,
              description="Evaluate run directories or fox-convert checkpoints. The default task, "
              "per_token_loss, gives loss against position\n(and beyond the training length) "
              "and validation loss, plotted together; needle and passkey\nscore greedy "
              "retrieval by exact match; mqar scores multi-query associative recall\n"
              "(teacher-forced accuracy at the answers); lm_eval runs lm-evaluation-harness "
              "tasks.",
              epilog="examples:\n  fox-eval runs/fox runs/transformer --out runs/compare\n"
              "  fox-eval runs/fox --task needle --lengths 1x,2x,4x --depths 0,50,100\n"
              "  fox-eval runs/fox --task passkey --lengths 256,1024 --trials 4\n"
              "  fox-eval runs/mqar --task mqar --lengths 1x,2x --num_kv_pairs 4,8,16\n"
              "  fox-eval runs/fox --task lm_eval --lm_eval_tasks piqa,hellaswag --limit 100\n"
              "  fox-eval runs/fox --task lm_eval --lm_eval_tasks my_task "
              "--lm_eval_include_path my_tasks/")
  p.add_argument("runs", nargs="+", help="run directories written by fox-train, or "
                 "checkpoints written by fox-convert (every task but per_token_loss; with "
                 "--train_length and tokenizer.json beside them)")
  p.add_argument("--task", default="per_token_loss",
                 help=f"evaluation to run: {', '.join(EVALS)} (default: per_token_loss)")
  p.add_argument("--out", default=None,
                 help="per_token_loss: directory for comparison.png, comparison.json and "
                 "report.md (default: the first run's eval directory); other tasks: directory "
                 "for <task>.json and <task>.png (default: each run's eval directory; with "
                 "several runs, one subdirectory per run)")
  p.add_argument("--step", type=int, default=None,
                 help="evaluate this checkpoint step (default: the newest that restores; "
                 "with several runs, the same step of each)")
  p.add_argument("--train_length", type=int, default=None, metavar="T",
                 help="a fox-convert checkpoint's training length (it records none; "
                 "'Mx' lengths and the default grids are multiples of it)")
  p.add_argument("--lengths", type=_csv(str), default=None, metavar="L1,L2,...",
                 help="context lengths in tokens, or multiples of the training length like "
                 "4x (per_token_loss: loss up to the longest; default per task)")
  p.add_argument("--depths", type=_csv(float), default=None, metavar="D1,D2,...",
                 help="needle / passkey depths in percent (needle default: 0,10,...,100)")
  p.add_argument("--modes", type=_csv(str), default=None, metavar="easy,standard",
                 help="needle modes (default: both)")
  p.add_argument("--style", default=None, choices=("code", "prose"),
                 help="needle: the needle and query in the corpus's own form ('code', for the "
                 "built-in corpus, the default) or the authors' sentences ('prose', for a "
                 "model of English text)")
  p.add_argument("--trials", type=int, default=None,
                 help="passkey: random pass keys per length and depth (default 2)")
  p.add_argument("--num_kv_pairs", type=_csv(int), default=None, metavar="K1,K2,...",
                 help="mqar: key-value pairs per example (default 4,8,16; a run trained on "
                 "MQAR: half, once and twice its own)")
  p.add_argument("--variant", default=None, choices=("standard", "last_value"),
                 help="mqar: 'last_value' reassigns keys, the latest value wins (default: "
                 "standard, or the run's own)")
  p.add_argument("--vocab", type=int, default=None, metavar="V",
                 help="mqar: task vocabulary, keys from its first half, values from its "
                 "second (default 256, or the run's own)")
  p.add_argument("--num_examples", type=int, default=None, metavar="N",
                 help="mqar: test examples per (length, pairs) cell (default 128)")
  p.add_argument("--seed", type=int, default=None, metavar="S",
                 help="mqar: seed of the test examples; passkey: of the pass keys (default 0)")
  p.add_argument("--lm_eval_tasks", type=_csv(str), default=None, metavar="T1,T2,...",
                 help="lm_eval: lm-evaluation-harness task names (zero-shot; the FoX "
                 "authors': wikitext,lambada_openai,piqa,hellaswag,winogrande,arc_easy,"
                 "arc_challenge,boolq,sciq,copa,openbookqa)")
  p.add_argument("--lm_eval_include_path", default=None, metavar="DIR",
                 help="lm_eval: a directory of task YAMLs of your own (e.g. over local "
                 "JSONL files)")
  p.add_argument("--limit", type=float, default=None, metavar="N",
                 help="lm_eval: examples per task (a count, or a fraction below 1)")
  p.add_argument("--batch_size", type=int, default=None, metavar="B",
                 help="rows per forward pass (lm_eval default 16, needle / passkey 8)")
  p.add_argument("--max_length", type=int, default=None, metavar="L",
                 help="lm_eval: tokens the model reads at once, longer contexts cut on "
                 "the left (default: the training length)")
  return p


# fox-eval flags that set a field of a task's Options (a task without it refuses them).
_TASK_FLAGS = ("depths", "modes", "style", "trials", "num_kv_pairs", "variant", "vocab",
               "num_examples", "seed", "lm_eval_tasks", "lm_eval_include_path", "limit",
               "batch_size", "max_length")


def _run_out(out: Optional[str], runs: Sequence[str], run: str) -> Optional[str]:
  if out is None or len(runs) == 1:
    return out
  return os.path.join(out, os.path.basename(os.path.normpath(run)))


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
  args = _eval_parser().parse_args(argv)
  _quiet_logs()
  try:
    from fox_jax import evals, evaluate
    evals.get(args.task)
    if args.task == "per_token_loss":
      extra = [f"--{k}" for k in _TASK_FLAGS + ("train_length",)
               if getattr(args, k) is not None]
      if extra:
        raise UsageError(f"{', '.join(extra)} do not apply to --task per_token_loss")
      out = args.out or os.path.join(args.runs[0], "eval")
      results = evaluate.compare(args.runs, out, step=args.step, lengths=args.lengths)
    else:
      outs = [_run_out(args.out, args.runs, r) for r in args.runs]
      if args.out is not None and len(set(outs)) < len(outs):
        raise UsageError(f"runs with the same directory name cannot share --out {args.out}")
      for run in args.runs:  # every run checked before any is evaluated or written
        evaluate.check_run(run, args.step)
      results = []
      for run, out in zip(args.runs, outs):
        r = evaluate.run_task(args.task, run, step=args.step, out=out, lengths=args.lengths,
                              train_length=args.train_length,
                              **{k: getattr(args, k) for k in _TASK_FLAGS})
        where = out or os.path.join(run, "eval")
        report_line = getattr(evals.get(args.task), "report_line", None)
        scores = report_line(r) if report_line else f"accuracy {_accuracy(r)}"
        at = "" if r["step"] is None else f" step {r['step']}"
        print(f"fox-eval: {r['label']}{at}: {args.task} {scores}; wrote "
              f"{os.path.join(where, args.task)}.json and .png")
        results.append(r)
      return 0
  except UsageError as e:
    print(f"fox-eval: {e}", file=sys.stderr)
    return 2
  print(evaluate.report_markdown(results))
  print(f"fox-eval: wrote {os.path.join(out, 'comparison.png')} and {os.path.join(out, 'report.md')}")
  return 0


def _accuracy(result: dict) -> str:
  acc = result.get("accuracy")
  if isinstance(acc, dict):
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
  return f"{acc:.3f}" if isinstance(acc, float) else str(acc)


def _generate_parser() -> argparse.ArgumentParser:
  p = _Parser(prog="fox-generate", description="Continue a text prompt with a trained or "
              "converted model and print the continuation (greedy by default).")
  p.add_argument("path", metavar="PATH", help="a fox-train run directory (its newest "
                 "checkpoint that restores) or a fox-convert output directory (with the "
                 "tokenizer.json its source checkpoint was published with)")
  p.add_argument("--prompt", metavar="TEXT", help="the prompt")
  p.add_argument("--prompt_file", metavar="FILE",
                 help="read the prompt from FILE (UTF-8; '-' for stdin) instead")
  p.add_argument("--max_new_tokens", type=int, default=128, metavar="N",
                 help="tokens to generate (default 128; the printed text stops at an "
                 "end-of-document token)")
  p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                 help="0 (default) is greedy; > 0 samples from softmax(logits / T)")
  p.add_argument("--top_k", type=int, default=None, metavar="K",
                 help="sample from the K most likely tokens only (needs --temperature > 0)")
  p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
  p.add_argument("--step", type=int, default=None, metavar="N",
                 help="a run's checkpoint step (default: the newest that restores)")
  return p


def _read_prompt(args) -> str:
  if (args.prompt is None) == (args.prompt_file is None):
    raise UsageError("give the prompt with either --prompt TEXT or --prompt_file FILE")
  if args.prompt is not None:
    text = args.prompt
  else:
    try:
      if args.prompt_file == "-":
        data = sys.stdin.buffer.read()
      else:
        with open(args.prompt_file, "rb") as f:
          data = f.read()
    except OSError as e:
      raise UsageError(f"cannot read --prompt_file {args.prompt_file}: {e.strerror}") from None
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UsageError(f"--prompt_file {args.prompt_file} is not UTF-8 text (byte {e.start})") from None
  if not text:
    raise UsageError("the prompt is empty")
  return text


def generate_main(argv: Optional[Sequence[str]] = None) -> int:
  """``fox-generate PATH --prompt TEXT``: prints the model's continuation of the prompt."""
  args = _generate_parser().parse_args(argv)
  try:
    text = _generate(args)
  except UsageError as e:
    print(f"fox-generate: {e}", file=sys.stderr)
    return 2
  print(text, flush=True)
  return 0


def _generate(args) -> str:
  import math
  if args.max_new_tokens < 1:
    raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
  if args.top_k is not None and args.temperature == 0:
    raise UsageError("--top_k needs --temperature > 0 (temperature 0 is greedy)")
  if args.top_k is not None and args.top_k < 1:
    raise UsageError(f"--top_k must be >= 1, got {args.top_k}")
  if not 0 <= args.seed < 2**32:
    raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
  prompt = _read_prompt(args)
  _quiet_logs()
  import jax
  import numpy as np
  from fox_jax import decode, loading

  def broken(b):
    print(f"fox-generate: checkpoint step {b.step} cannot be restored ({b.reason}); left in "
          f"place, using an older one", file=sys.stderr, flush=True)

  loaded = loading.load_model(args.path, step=args.step, on_broken=broken)
  vocab = loaded.model.cfg.vocab_size
  if args.top_k is not None and args.top_k > vocab:
    raise UsageError(f"--top_k must be at most the vocabulary size {vocab}, got {args.top_k}")
  ids = loaded.tokenizer.encode(prompt)
  if ids.size == 0:
    raise UsageError("the prompt encodes to no tokens")
  if ids.max() >= vocab:
    raise UsageError(f"the prompt has token id {int(ids.max())}, outside the model's "
                     f"vocabulary of {vocab} ({loaded.tokenizer.name} does not fit this model)")
  out = decode.generate(loaded.model, ids[None, :], args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k,
                        rng=jax.random.key(args.seed))
  return loaded.tokenizer.decode(np.asarray(out)[0, ids.size:])


def _convert_parser() -> argparse.ArgumentParser:
  from fox_jax.config import ATTN_IMPLS
  from fox_jax.convert import AUTHORS_MODEL_TYPE, FLA_MODEL_TYPE
  p = _Parser(
      prog="fox-convert",
      description="Convert a PyTorch FoX checkpoint directory (the authors' Hugging Face "
      f"format, model_type {AUTHORS_MODEL_TYPE!r}, or fla's {FLA_MODEL_TYPE!r} saved with "
      "save_pretrained; config.json + safetensors) into OUTPUT_DIR/model_config.json and an "
      "orbax checkpoint OUTPUT_DIR/params for fox_jax (read back with "
      "fox_jax.convert.load_converted; fox-eval and fox-generate take OUTPUT_DIR, with the "
      "checkpoint's tokenizer.json placed beside it). Any problem with the input is one "
      "line on stderr and exit status 2, and leaves nothing in OUTPUT_DIR.")
  p.add_argument("checkpoint_dir", help="directory with config.json and model.safetensors "
                 "(or model.safetensors.index.json and its shards)")
  p.add_argument("output_dir", help="where to write model_config.json and params/: a new "
                 "or empty directory (see --overwrite)")
  # choices: a bad value is a usage error naming the flag, before any file is read
  p.add_argument("--attn_impl", default=None, choices=ATTN_IMPLS, metavar="IMPL",
                 help="ModelConfig.attn_impl to record (" + ", ".join(ATTN_IMPLS)
                 + "; default: auto)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the conversion already in OUTPUT_DIR (its model_config.json "
                 "and params/; other files stay). A non-empty directory holding no "
                 "conversion (a fox-jax model_config.json and orbax's files, nothing "
                 "else, in params/) is refused regardless")
  return p


def _one_line(e: Exception) -> str:
  if isinstance(e, OSError) and e.strerror:
    text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
  else:
    text = str(e) or type(e).__name__
  return " ".join(text.splitlines())


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
  """``fox-convert CHECKPOINT_DIR OUTPUT_DIR [--attn_impl IMPL] [--overwrite]``."""
  args = _convert_parser().parse_args(argv)
  import jax
  import numpy as np
  from flax import nnx
  from fox_jax.convert import convert_dir
  from fox_jax.converted import Interrupted
  out_dir = os.path.abspath(args.output_dir)
  try:
    cfg, model = convert_dir(args.checkpoint_dir, out_dir, attn_impl=args.attn_impl,
                             overwrite=args.overwrite)
  except (ValueError, OSError) as e:
    print(f"fox-convert: {_one_line(e)}", file=sys.stderr)
    return 2
  except Interrupted as e:  # the shell's status for death by that signal
    print(f"fox-convert: {e}; no partial output is left", file=sys.stderr)
    return 128 + e.signum
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
  print(f"fox-convert: {n:,} parameters ({cfg.num_layers} layers, d_model {cfg.d_model}, "
        f"forget gate {cfg.forget_gate!r}) -> {out_dir}")
  return 0


def lm_eval_main() -> int:
  """``fox-lm-eval``: lm_eval's own command line with the ``fox`` model registered, e.g.
  ``fox-lm-eval --model fox --model_args path=RUN_DIR --tasks piqa`` (lm_eval's flags)."""
  from fox_jax.evals import harness
  try:
    harness.require_lm_eval()
  except UsageError as e:
    print(f"fox-lm-eval: {e}", file=sys.stderr)
    return 2
  from lm_eval.__main__ import cli_evaluate
  try:
    cli_evaluate()
  except UsageError as e:
    print(f"fox-lm-eval: {e}", file=sys.stderr)
    return 2
  return 0

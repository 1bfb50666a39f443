"""The run configuration: one ml_collections ConfigDict per experiment.

Experiment files under ``experiments/configs/`` start from :func:`base_config` and change
what they need (:func:`load_config_file`); every field can be overridden on the command line
(``--config.optim.peak_lr=1e-3``, ``fox_jax.config_flags.apply_overrides``), every field of
``fox_jax.config.ModelConfig`` included (``--config.model.overrides.num_kv_heads=2``), also
when the file does not set it. :func:`validate` checks every field before any device work.
The resolved config is saved in the run directory.

Blocks:
  model  preset name (``fox_jax.config.get_preset``) and ``overrides`` of its fields
  data   source ('builtin' = this interpreter's stdlib, 'text' = files at ``path``, 'mqar' =
         the synthetic recall task of ``fox_jax.data.mqar`` set by the ``mqar_*`` fields),
         held-out fraction, sequence length, global batch (rows per optimizer step), seed
  optim  AdamW and the token-measured schedule; ``grad_accum`` micro-batches per step
  mesh   sizes of (data, fsdp, context, tensor); -1 = the remaining devices
  run    seed, logging / checkpoint / validation cadence, checkpoints kept, peak FLOP/s
  eval   lengths for loss against position (multiples of data.seq_len), documents, smoothing

Resuming a run directory with another config: the fields in :data:`SAFE_ON_RESUME` may
change (cadence, checkpoints kept, evaluation, mesh, micro-batching, the batch, the token
budget, and how the same model is computed: attention implementation, tiles,
rematerialisation, sequence chunks, the context-parallel strategy); any other
difference changes the model, the optimizer or the data order, and the run refuses to start
(:func:`resume_changes`). The model is compared as the ModelConfig it resolves to, so a
field set to the value the preset derives anyway is no change.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib.util
import inspect
import json
import math
import os
import typing
from typing import Any, Optional, Sequence

import ml_collections

from fox_jax.data import datasets, mqar
from fox_jax.errors import UsageError

DATA_SOURCES = tuple(datasets.DATASETS)

# Fields that may differ when a run directory is resumed: they change neither the model,
# nor the optimizer's recipe, nor which rows come next. The schedule is a function of the
# tokens seen, so a new batch or token budget continues it from where the run is.
SAFE_ON_RESUME = (
    "version", "run.log_every", "run.checkpoint_every", "run.keep_checkpoints", "run.eval_every",
    "run.val_rows", "run.progress_bar", "run.peak_flops_per_device", "eval.*", "mesh.*",
    "optim.grad_accum", "optim.total_tokens", "data.global_batch", "data.loader", "data.workers",
    "data.read_threads",
    "model.attn_impl", "model.plain_attn_impl", "model.block_sizes*", "model.remat",
    "model.seq_chunk", "model.context_strategy", "model.context_stripe",
)


# The layout of a saved config. 1 (no ``version`` field): forget gate 'none' ran the
# forgetting op with a zero gate; 2: it runs ``model.plain_attn_impl`` (plain attention);
# 3: documents are read by ``data.loader`` (grain by default; 1 and 2 read the in-memory
# 'packed' stream) and the vocabulary follows ``data.tokenizer`` when not given.
CONFIG_VERSION = 3


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.version = CONFIG_VERSION

  c.model = ml_collections.ConfigDict()
  c.model.preset = "fox_pro_tiny"
  # Without a vocab_size here the model's vocabulary is the data's ids (the tokenizer's, or
  # data.vocab_size for token ids) rounded up to a multiple of 128 so that 'vocab' shards:
  # 384 for the byte tokenizer's 259.
  c.model.overrides = ml_collections.ConfigDict(
      {"dtype": "bfloat16", "param_dtype": "float32", "remat": False, "attn_impl": "auto"})

  c.data = ml_collections.ConfigDict()
  # One of fox_jax.data.datasets.DATASETS: builtin | text | tfds | longcrawl64 |
  # array_record | mqar. data.path: text, a directory or a glob; tfds, a prepared dataset
  # directory; longcrawl64, the directory of train.zarr and heldout.zarr; array_record, a
  # shard, a directory of shards or a glob.
  c.data.source = "builtin"
  c.data.path = ""
  # Held-out documents: data.heldout_path (text, array_record), the TFDS split
  # tfds_heldout_split, heldout.zarr (longcrawl64), or else this fraction by a stable hash.
  c.data.heldout_path = ""
  c.data.heldout_fraction = 0.05
  # "bytes" (UTF-8 bytes + PAD/BOS/EOS, 259 ids), a Hugging Face tokenizer.json (or its
  # directory) or a SentencePiece .model file; sources of token ids do not tokenize.
  c.data.tokenizer = "bytes"
  # Number of token ids of a pre-tokenized source (0: the tokenizer's; longcrawl64: GPT-2's).
  c.data.vocab_size = 0
  c.data.tfds_feature = "text"
  c.data.tfds_train_split = "train"
  c.data.tfds_heldout_split = ""
  c.data.array_record_dtype = "uint32"
  # "grain" (streamed, packed per row lane; fox_jax.data.loader), "packed" (the whole split
  # in memory, as runs before config version 3 read it) or "auto": a resumed run's own
  # loader, grain for a new run (resolve_loader).
  c.data.loader = "auto"
  c.data.workers = 0           # grain worker processes (part of the data order)
  c.data.packing_bins = 8      # rows each lane packs at once (first fit)
  c.data.read_threads = 0      # threads per lane reading documents ahead (not the data order)
  c.data.seq_len = 256
  c.data.global_batch = 16
  c.data.seed = 0
  # data.source = "mqar" (fox_jax.data.mqar): keys from the first half of mqar_vocab, values
  # from the second; data.seq_len tokens per example; mqar_num_updates keys reassigned in
  # the "last_value" variant (None: half the keys); a fixed set of train / held-out examples.
  c.data.mqar_vocab = 256
  c.data.mqar_num_kv_pairs = 8
  c.data.mqar_variant = "standard"
  c.data.mqar_num_updates = None
  c.data.mqar_power_a = 0.01
  c.data.mqar_train_examples = 100_000
  c.data.mqar_test_examples = 3_000

  c.optim = ml_collections.ConfigDict()
  c.optim.peak_lr = 2e-3
  c.optim.warmup_tokens = 100_000
  c.optim.total_tokens = 1_000_000
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0
  c.optim.grad_accum = 1

  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "context": 1, "tensor": 1})

  c.run = ml_collections.ConfigDict()
  c.run.seed = 0
  c.run.log_every = 10
  c.run.checkpoint_every = 200
  c.run.keep_checkpoints = 3
  c.run.eval_every = 0
  c.run.val_rows = 64
  c.run.peak_flops_per_device = 0.0
  c.run.progress_bar = True

  c.eval = ml_collections.ConfigDict()
  c.eval.length_multiples = (1, 4)
  c.eval.max_docs = 64
  c.eval.batch_size = 8
  c.eval.smooth = 21
  return c


def resolve_loader(c: ml_collections.ConfigDict,
                   saved: Optional[ml_collections.ConfigDict]) -> None:
  """Resolves ``data.loader = "auto"``: the loader the saved run in the directory read (so
  resuming an old run with its original command keeps its data stream), else "grain"."""
  if c.data.get("loader", "auto") == "auto":
    c.data.loader = (saved.data.get("loader") if saved is not None else None) or "grain"
    if c.data.loader == "auto":
      c.data.loader = "grain"


def data_vocab_size(c: ml_collections.ConfigDict) -> int:
  """The vocabulary a model of ``c`` gets when its config gives none: the data's ids (the
  tokenizer's, or data.vocab_size) rounded up to a multiple of 128, so that 'vocab' shards
  (384 for the byte tokenizer). ValueError or OSError when the data cannot say."""
  from fox_jax.data import tokenizer
  need, _ = datasets.source(c.data).vocab(c.data)
  return tokenizer.padded_vocab_size(need)


def tokens_per_step(c: ml_collections.ConfigDict) -> int:
  return int(c.data.global_batch) * int(c.data.seq_len)


def total_steps(c: ml_collections.ConfigDict) -> int:
  """Optimizer steps covering ``optim.total_tokens`` (rounded up) at this config's batch."""
  return -(-int(c.optim.total_tokens) // tokens_per_step(c))


def cpu_demo_config(preset: str) -> ml_collections.ConfigDict:
  """The README main command's recipe: a small model trained for ~2 minutes on 2 CPU cores.

  4 layers, d_model 128, 4 heads x 32, byte-level, 256-token rows of the built-in corpus,
  16 rows per step, 800k tokens (196 steps), peak learning rate 3e-3 after 80k tokens.
  FoX and Transformer runs differ only in ``preset``.
  """
  c = base_config()
  c.model.preset = preset
  c.model.overrides.update({"num_layers": 4, "d_model": 128, "num_heads": 4})
  c.data.seq_len = 256
  c.data.global_batch = 16
  c.optim.peak_lr = 3e-3
  c.optim.warmup_tokens = 80_000
  c.optim.total_tokens = 800_000
  c.run.checkpoint_every = 100
  c.eval.length_multiples = (1, 4)
  return c


def cpu_mqar_config(preset: str) -> ml_collections.ConfigDict:
  """A tiny model trained on MQAR (``data.source = "mqar"``) in a few minutes on 2 CPU cores.

  2 layers, d_model 64, 4 heads x 16, float32; MQAR with vocabulary 64 (32 keys, 32 values:
  chance 1/32), 4 key-value pairs in 64-token rows, 20k training and 1k held-out examples;
  32 rows per step, peak learning rate 3e-3 after 50 steps, 600 steps (1.2M tokens, 19k
  answers). FoX and Transformer runs differ only in ``preset``.
  """
  c = base_config()
  c.model.preset = preset
  c.model.overrides.update(
      {"vocab_size": 128, "num_layers": 2, "d_model": 64, "num_heads": 4, "dtype": "float32"})
  c.data.source = "mqar"
  c.data.seq_len = 64
  c.data.global_batch = 32
  c.data.mqar_vocab = 64
  c.data.mqar_num_kv_pairs = 4
  c.data.mqar_train_examples = 20_000
  c.data.mqar_test_examples = 1_000
  c.optim.peak_lr = 3e-3
  c.optim.warmup_tokens = 50 * 32 * 64
  c.optim.total_tokens = 600 * 32 * 64
  c.run.log_every = 50
  c.run.checkpoint_every = 200
  c.run.eval_every = 200
  c.run.val_rows = 256
  c.eval.length_multiples = (1,)
  c.eval.batch_size = 64
  return c


# The FoX paper's recipe at 16k tokens (its section 4 and appendix): tokens and peak
# learning rate per size.
_PAPER_16K = {"125m": (int(2.5 * 2**30), 2e-3), "360m": (7 * 2**30, 2e-3),
              "760m": (15 * 2**30, 1e-3)}


def paper_context_config(preset: str, context: int = 8) -> ml_collections.ConfigDict:
  """The paper's 16k-token training recipe for ``preset`` (e.g. "fox_pro_360m") with the
  sequence split over ``context`` devices.

  32 rows of 16,384 tokens (2^19 tokens) per step, AdamW (0.9, 0.95), weight decay 0.1,
  clip 1.0, warmup 256 Mi tokens then cosine to zero over the paper's token budget for the
  size, bf16 compute, blocks rematerialised, the LM head and MLP in 4 chunks per shard.
  Mesh: ``context`` devices on the sequence (within a host or an ICI slice, where the ring's
  transfers belong) and FSDP over the rest (mesh fsdp = -1). On a single 8-device host
  every device holds all 32 rows (of 16384 / context tokens each): add
  ``--config.optim.grad_accum=4`` (or more) to hold fewer at a time.
  """
  size = preset.rsplit("_", 1)[-1]
  if size not in _PAPER_16K:
    raise ValueError(f"preset must be a paper size ({', '.join(_PAPER_16K)}), got {preset!r}")
  if 16384 % (4 * context):
    raise ValueError(f"context must divide 16384 / 4, got {context}")
  tokens, lr = _PAPER_16K[size]
  c = base_config()
  c.model.preset = preset
  c.model.overrides = ml_collections.ConfigDict(
      {"remat": True, "seq_chunk": 16384 // context // 4, "context_strategy": "zigzag"})
  c.data.seq_len = 16384
  c.data.global_batch = 32
  c.optim.peak_lr = lr
  c.optim.warmup_tokens = 256 * 2**20
  c.optim.total_tokens = tokens
  c.mesh.update({"data": 1, "fsdp": -1, "context": context, "tensor": 1})
  c.run.log_every = 50
  c.run.checkpoint_every = 1000
  c.run.eval_every = 1000
  c.eval.length_multiples = (1,)
  c.eval.batch_size = 8
  return c


# ----------------------------------------------------------------------------- validation


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, field: str, rule: str, value) -> None:
  if not ok:
    raise UsageError(f"config.{field} must be {rule}, got {value!r}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises UsageError naming the first field that cannot be used; touches no device."""
  for block in ("model", "data", "optim", "mesh", "run", "eval"):
    if block not in c:
      raise UsageError(f"config has no '{block}' block (start from run_config.base_config())")
  d, o, r, e = c.data, c.optim, c.run, c.eval
  _check(d.source in DATA_SOURCES, "data.source", f"one of {DATA_SOURCES}", d.source)
  paths = {"text": "a directory or a glob of text files", "tfds": "a prepared TFDS dataset "
           "directory", "longcrawl64": "the directory of train.zarr and heldout.zarr",
           "array_record": "an ArrayRecord shard, a directory of shards or a glob"}
  if d.source in paths:
    _check(isinstance(d.path, str) and bool(d.path), "data.path",
           f"{paths[d.source]} with data.source={d.source!r}", d.path)
  elif d.source == "builtin" and d.get("path"):
    raise UsageError(f"config.data.path is given ({d.path}) but data.source is 'builtin' (this "
                     f"interpreter's standard library), which reads no path; set "
                     f"data.source='text' to train on it")
  _check(d.get("loader", "auto") in ("auto", "grain", "packed"), "data.loader",
         "'auto', 'grain' or 'packed'", d.get("loader"))
  for name, low in (("workers", 0), ("packing_bins", 1), ("vocab_size", 0), ("read_threads", 0)):
    if name in d:
      _check(_is_int(d[name]) and d[name] >= low, f"data.{name}", f"an int >= {low}", d[name])
  _check(isinstance(d.get("tokenizer", "bytes"), str) and bool(d.get("tokenizer", "bytes")),
         "data.tokenizer", "'bytes' or the path of a tokenizer.json or SentencePiece .model",
         d.get("tokenizer"))
  _check(_is_real(d.heldout_fraction) and 0 < d.heldout_fraction < 1, "data.heldout_fraction",
         "in (0, 1)", d.heldout_fraction)
  for name in ("seq_len", "global_batch"):
    _check(_is_int(d[name]) and d[name] >= 1, f"data.{name}", "an int >= 1", d[name])
  _check(_is_int(d.seed), "data.seed", "an int", d.seed)
  if d.source == "mqar":
    for name in ("mqar_train_examples", "mqar_test_examples"):
      _check(_is_int(d[name]) and d[name] >= 1, f"data.{name}", "an int >= 1", d[name])
    try:
      mqar.spec_from_config(d)
    except ValueError as e:
      raise UsageError(str(e)) from None

  _check(_is_real(o.peak_lr) and o.peak_lr > 0, "optim.peak_lr", "a finite number > 0",
         o.peak_lr)
  _check(_is_real(o.warmup_tokens) and o.warmup_tokens >= 0, "optim.warmup_tokens",
         "a finite number >= 0", o.warmup_tokens)
  _check(_is_real(o.total_tokens) and o.total_tokens >= 1, "optim.total_tokens",
         "a finite number >= 1", o.total_tokens)
  for name in ("b1", "b2"):
    _check(_is_real(o[name]) and 0 <= o[name] < 1, f"optim.{name}", "in [0, 1)", o[name])
  _check(_is_real(o.eps) and o.eps > 0, "optim.eps", "a finite number > 0", o.eps)
  _check(_is_real(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay",
         "a finite number >= 0", o.weight_decay)
  _check(_is_real(o.clip_norm) and o.clip_norm > 0, "optim.clip_norm", "a finite number > 0",
         o.clip_norm)
  _check(_is_int(o.grad_accum) and o.grad_accum >= 1, "optim.grad_accum", "an int >= 1",
         o.grad_accum)
  if d.global_batch % o.grad_accum:
    raise UsageError(f"config.data.global_batch ({d.global_batch}) must be a multiple of "
                     f"config.optim.grad_accum ({o.grad_accum})")

  for name, size in c.mesh.items():
    _check(_is_int(size) and (size >= 1 or size == -1), f"mesh.{name}",
           "an int >= 1 or -1 (the remaining devices)", size)

  _check(_is_int(r.seed), "run.seed", "an int", r.seed)
  for name, why in (("log_every", ""), ("checkpoint_every", ""),
                    ("keep_checkpoints", " (0 would keep no checkpoint)"),
                    ("val_rows", " (the validation loss averages over them)")):
    _check(_is_int(r[name]) and r[name] >= 1, f"run.{name}", f"an int >= 1{why}", r[name])
  _check(_is_int(r.eval_every) and r.eval_every >= 0, "run.eval_every",
         "an int >= 0 (0: validate only at the end)", r.eval_every)
  _check(_is_real(r.peak_flops_per_device) and r.peak_flops_per_device >= 0,
         "run.peak_flops_per_device", "a finite number >= 0 (0: known devices only)",
         r.peak_flops_per_device)
  _check(isinstance(r.progress_bar, bool), "run.progress_bar", "True or False", r.progress_bar)

  lm = tuple(e.length_multiples) if isinstance(e.length_multiples, (tuple, list)) else ()
  _check(bool(lm) and all(_is_int(m) and m >= 1 for m in lm), "eval.length_multiples",
         "a non-empty tuple of ints >= 1", e.length_multiples)
  for name in ("max_docs", "batch_size", "smooth"):
    _check(_is_int(e[name]) and e[name] >= 1, f"eval.{name}", "an int >= 1", e[name])


def check_fields(c: ml_collections.ConfigDict) -> None:
  """UsageError for a field the config lacks or one :func:`base_config` does not know (a
  typo in a config file would otherwise be ignored). ``model.overrides`` holds ModelConfig
  fields, checked when the model is built."""
  known = flatten(base_config())
  given = flatten(c)
  model_fields = set(_model_field_types())
  for key in sorted(given):
    if key.startswith("model.overrides."):
      if key.split(".")[2] not in model_fields:
        raise _unknown(key, [f"model.overrides.{f}" for f in model_fields], prefix="config.")
    elif key not in known and key != "model.overrides":
      raise _unknown(key, list(known), prefix="config.")
  for key in known:
    if not key.startswith("model.overrides") and key not in given:
      raise UsageError(f"config.{key} is missing (start from run_config.base_config())")


def resolve_paths(c: ml_collections.ConfigDict) -> None:
  """Makes ``data.path``, ``data.heldout_path`` and a ``data.tokenizer`` file absolute
  (``~`` expanded), so a resume from another working directory reads the same files."""
  for field in ("path", "heldout_path", "tokenizer"):
    value = c.data.get(field)
    if value and not (field == "tokenizer" and value == "bytes"):
      c.data[field] = os.path.abspath(os.path.expanduser(value))


# ----------------------------------------------------------------------------- loading


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``get_config()`` of a Python config file, or ``get_config(arg)`` for ``path:arg``
  (one file for runs that differ only in an argument, e.g. the model family, as big_vision
  does); one-line UsageError for every failure."""
  path, arg = spec, None
  if not os.path.isfile(spec):
    # The first ':' whose prefix is a file separates the argument (which may hold ':').
    splits = [i for i, ch in enumerate(spec) if ch == ":" and os.path.isfile(spec[:i])]
    if not splits:
      raise UsageError(f"--config: no such file: {spec}")
    path, arg = spec[:splits[0]], spec[splits[0] + 1:]
  module_spec = importlib.util.spec_from_file_location("fox_experiment_config", path)
  try:
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except Exception as e:  # the user's file: report where, not our traceback
    where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
    raise UsageError(f"--config {path}{where}: {type(e).__name__}: {e}") from e
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise UsageError(f"--config {path} defines no get_config()")
  params = [p for p in inspect.signature(get_config).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  takes_args = len(params) < len(inspect.signature(get_config).parameters)
  if arg is not None and not params and not takes_args:
    raise UsageError(f"--config {spec}: get_config() of {path} takes no argument")
  if arg is None and params and params[0].default is inspect.Parameter.empty:
    raise UsageError(f"--config {path} needs an argument: --config {path}:ARG "
                     f"({_arg_help(get_config)})")
  try:
    c = get_config() if arg is None else get_config(arg)
  except Exception as e:
    raise UsageError(f"--config {spec}: get_config() raised {type(e).__name__}: {e}") from e
  if not isinstance(c, ml_collections.ConfigDict):
    raise UsageError(f"--config {spec}: get_config() must return an ml_collections.ConfigDict, "
                     f"got {type(c).__name__}")
  return c


def _arg_help(get_config) -> str:
  doc = (get_config.__doc__ or "").strip().splitlines()
  return doc[0] if doc else "see the file"


def config_arg(arg: str, choices: Sequence[str]) -> str:
  """``arg`` of a config file's ``get_config(arg)`` if it is one of ``choices``, else a
  ValueError listing them (``load_config_file`` reports it in one line)."""
  if arg not in choices:
    raise ValueError(f"the argument must be one of {', '.join(choices)}, got {arg!r}")
  return arg


def config_from_json(text: str, source: str) -> ml_collections.ConfigDict:
  """A config saved by :func:`config_to_json`; UsageError naming ``source`` if unreadable."""
  try:
    fields = json.loads(text)
  except json.JSONDecodeError as e:
    raise UsageError(f"{source} is not valid JSON ({e.msg} at line {e.lineno})") from e
  if not isinstance(fields, dict) or "model" not in fields:
    raise UsageError(f"{source} does not hold a fox-train config")
  c = ml_collections.ConfigDict(fields)
  if "eval" in c and isinstance(c.eval.get("length_multiples"), list):
    c.eval.length_multiples = tuple(c.eval.length_multiples)
  _add_new_fields(c)
  return c


def _add_new_fields(c: ml_collections.ConfigDict) -> None:
  """Gives a saved config the fields :func:`base_config` gained after it was saved (e.g. the
  ``data.mqar_*`` fields), at their defaults, which select what the saved run did; the
  model's ``overrides`` are left as saved, except that a version-1 Transformer keeps the
  attention it ran (:func:`_pin_forgetting_baseline`)."""
  base = base_config()
  for block in base.keys():
    if block == "model" or block not in c or not isinstance(c[block], ml_collections.ConfigDict):
      continue
    for name, value in base[block].items():
      if name not in c[block]:
        c[block][name] = value
  if "version" not in c:
    _pin_forgetting_baseline(c)
    c.version = 2
  if c.version < 3 and "loader" in c.get("data", {}):
    # Read documents as the run did: the in-memory packed stream.
    c.data.loader = "packed"
  c.version = CONFIG_VERSION


def _pin_forgetting_baseline(c: ml_collections.ConfigDict) -> None:
  """A version-1 run with forget gate 'none' ran the forgetting op with a zero gate: it keeps
  doing so (``plain_attn_impl='forgetting'``), so that resuming it stays bitwise; a config
  that asks for plain attention is then a recorded change on resume."""
  from fox_jax.config import get_preset
  overrides = c.model.get("overrides") or ml_collections.ConfigDict()
  try:
    gate = overrides.get("forget_gate") or get_preset(c.model.preset).forget_gate
  except (ValueError, KeyError, AttributeError):
    return  # an unknown preset is reported when the model is built
  if gate == "none" and "plain_attn_impl" not in overrides:
    if "overrides" not in c.model:
      c.model.overrides = ml_collections.ConfigDict()
    c.model.overrides.plain_attn_impl = "forgetting"


def config_to_json(c: ml_collections.ConfigDict) -> str:
  return c.to_json_best_effort(indent=2, sort_keys=True) + "\n"


# ----------------------------------------------------------------------------- fields


def _model_field_types() -> dict[str, Any]:
  from fox_jax.config import ModelConfig
  hints = typing.get_type_hints(ModelConfig)
  return {f.name: hints[f.name] for f in dataclasses.fields(ModelConfig)}


def _unknown(key: str, known: Sequence[str], prefix: str = "--config.") -> UsageError:
  close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
  hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
  return UsageError(f"{prefix}{key}: no such config field{hint}")


# ----------------------------------------------------------------------------- resume


def flatten(c) -> dict[str, Any]:
  """{dotted key: JSON value} of every leaf (tuples as lists, so saved and new compare)."""
  data = json.loads(c.to_json_best_effort()) if isinstance(c, ml_collections.ConfigDict) else c
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict) and v:
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v
  walk(data, "")
  return out


def _safe(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in SAFE_ON_RESUME)


def _resolved(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Leaves of ``c`` with the model block replaced by the ModelConfig it resolves to."""
  from fox_jax.config import get_preset
  out = {k: v for k, v in flatten(c).items() if not k.startswith("model.")}
  try:
    overrides = c.model.overrides.to_dict() if c.model.get("overrides") else {}
    if "vocab_size" not in overrides:
      overrides["vocab_size"] = data_vocab_size(c)
    model = get_preset(c.model.preset, **overrides).to_dict()
  except (ValueError, TypeError, AttributeError):
    return flatten(c)  # compared as written; the new config is checked when built
  out.update({f"model.{k}": v for k, v in flatten(json.loads(json.dumps(model))).items()})
  return out


def resume_changes(saved: ml_collections.ConfigDict,
                   new: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{field: (saved, new)} of the allowed changes; UsageError listing the refused ones."""
  a, b = _resolved(saved), _resolved(new)
  missing = object()
  diff = {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)}
  show = lambda v: "(unset)" if v is missing else json.dumps(v)
  refused = {k: v for k, v in diff.items() if not _safe(k)}
  if refused:
    listed = "; ".join(f"{k}: {show(x)} -> {show(y)}" for k, (x, y) in refused.items())
    raise UsageError(
        f"the run directory was trained with another config; refused changes: {listed}. "
        f"These change the model, the optimizer or the data order; use a new --workdir. "
        f"Allowed on resume: {', '.join(SAFE_ON_RESUME)}")
  return {k: (None if x is missing else x, None if y is missing else y)
          for k, (x, y) in diff.items()}

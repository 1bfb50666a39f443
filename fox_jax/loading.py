"""One way to get a model and its tokenizer out of a directory, for sampling and scripts.

``load_model(path)`` accepts either

* a ``fox-train`` run directory (``config.json`` + ``checkpoints/``): the newest checkpoint
  that restores (or ``step``), on the run's mesh when the devices here can hold it and with
  FSDP over them otherwise (as ``fox-eval`` does); its tokenizer is the byte tokenizer
  (``fox_jax.data.tokenizer``), the only one the text sources ('builtin', 'text') use (a run
  on the synthetic 'mqar' task reads ids, not text: it gets the byte tokenizer too, and
  ``fox_jax.evals.mqar`` gives it the task's ids as it trained on them);
* a ``fox-convert`` output directory (``model_config.json`` + ``params/``), read by
  ``fox_jax.converted.load_converted``; a converted checkpoint records no tokenizer, so its
  tokenizer is the Hugging Face ``tokenizer.json`` placed beside them (the file the source
  checkpoint was published with), read offline with the ``tokenizers`` package.

Reading only: nothing is created, moved or rewritten in the directory (a broken newest
checkpoint is reported and skipped, not moved aside). Every problem is a one-line
``UsageError``: a path that is neither kind, a missing step, a checkpoint that cannot be
restored, a tokenizer that cannot be had offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Optional

import jax

from fox_jax import converted as converted_lib
from fox_jax import rundir
from fox_jax.data import DATASETS, datasets
from fox_jax.data import tokenizer as tokenizer_lib
from fox_jax.errors import UsageError

# The tokenizers (fox_jax.data.tokenizer) under the names this module gave them first.
ByteTokenizer = tokenizer_lib.BytesTokenizer
HFTokenizer = tokenizer_lib.HFTokenizer
Tokenizer = tokenizer_lib.Tokenizer
TOKENIZER_FILE = tokenizer_lib.TOKENIZER_FILE
TOKENIZER_CONFIG_FILE = tokenizer_lib.TOKENIZER_CONFIG_FILE


@dataclasses.dataclass
class Loaded:
  model: object              # fox_jax.model.DecoderLM (nnx)
  tokenizer: Optional[Tokenizer]
  step: Optional[int]        # the checkpoint's step; None for a converted checkpoint
  source: str                # "run" | "converted"


def _report_broken(broken) -> None:
  print(f"checkpoint step {broken.step} cannot be restored ({broken.reason}); left in place, "
        f"loading an older one", file=sys.stderr, flush=True)


def kind(path: str) -> str:
  """"run" or "converted"; UsageError naming what ``path`` lacks if it is neither."""
  if not os.path.isdir(path):
    raise UsageError(f"no such directory: {path}" if not os.path.lexists(path) else
                     f"{path} is not a directory")
  has = lambda name: os.path.lexists(os.path.join(path, name))
  if has(converted_lib.MODEL_CONFIG_NAME):
    return "converted"  # load_converted names a missing params/
  if has(rundir.CONFIG_FILE) and has("checkpoints"):
    return "run"
  if has(rundir.CONFIG_FILE) and any(name.endswith(".safetensors") or
                                     name == "model.safetensors.index.json"
                                     for name in os.listdir(path)):
    raise UsageError(f"{path} looks like a Hugging Face checkpoint; convert it first "
                     f"(fox-convert {path} OUTPUT_DIR) and load OUTPUT_DIR")
  if has(rundir.CONFIG_FILE):
    return "run"  # a run without checkpoints: named as such by the run loader
  raise UsageError(f"{path} is neither a fox-train run directory (config.json, checkpoints/) "
                   f"nor a fox-convert checkpoint (model_config.json, params/)")


def load_model(path: str, *, step: Optional[int] = None, devices=None,
               require_tokenizer: bool = True,
               on_broken: Callable = _report_broken) -> Loaded:
  """The model and tokenizer in ``path``: a run directory or a converted checkpoint.

  step: a run's checkpoint step (default: the newest that restores; ``on_broken`` is told of
    each newer one that does not). devices: for a run (default: all). require_tokenizer:
    when False, a converted checkpoint without a usable tokenizer loads with tokenizer None.
  """
  what = kind(path)
  if what == "run":
    return _load_run(path, step, devices, on_broken)
  if step is not None:
    raise UsageError(f"{path} is a fox-convert checkpoint, which has no steps; drop the step")
  return _load_converted(path, require_tokenizer)


def run_setup(c, workdir: str, devices):
  """The ``train.Setup`` of run config ``c`` on its own mesh when ``devices`` can hold it;
  otherwise (a run trained on more devices, e.g. with context parallelism) with FSDP over
  ``devices``, said on stderr: evaluation and sampling do not depend on the mesh."""
  from fox_jax import sharding
  from fox_jax import train as train_lib
  try:
    sharding.mesh_shape(c.mesh.to_dict(), len(devices))
  except ValueError:
    print(f"fox-jax: {workdir}: its mesh {c.mesh.to_dict()} does not fit the {len(devices)} "
          f"device(s) here; using FSDP over them", file=sys.stderr, flush=True)
    c.mesh.update({"data": 1, "fsdp": -1, "context": 1, "tensor": 1})
  return train_lib.build(c, devices)


def _load_run(workdir: str, step: Optional[int], devices, on_broken) -> Loaded:
  from fox_jax import evaluate
  c = rundir.load_config(workdir)
  if c.data.source not in DATASETS:
    raise UsageError(f"{rundir.config_path(workdir)}: data.source {c.data.source!r} has no "
                     f"tokenizer known to fox-jax (sources: {', '.join(DATASETS)})")
  devices = list(jax.devices() if devices is None else devices)
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
    raise UsageError(f"{workdir} holds no checkpoint yet")
  setup = run_setup(c, workdir, devices)
  step, params = evaluate.restore_params(workdir, setup, step=step, on_broken=on_broken)
  return Loaded(setup.model(params), run_tokenizer(c, workdir), int(step), "run")


def run_tokenizer(c, workdir: str):
  """The tokenizer a run trained with (its config's ``data.tokenizer``; the byte tokenizer
  for runs saved before the field, and for sources of token ids without one)."""
  try:
    return tokenizer_lib.load_tokenizer(datasets.tokenizer_spec(c.data))
  except (UsageError, ValueError, OSError) as e:
    raise UsageError(f"{rundir.config_path(workdir)}: data.tokenizer: {e}") from None


def _load_converted(path: str, require_tokenizer: bool) -> Loaded:
  tokenizer = None
  try:
    tokenizer = converted_tokenizer(path)
  except UsageError:
    if require_tokenizer:
      raise
  try:
    _, model = converted_lib.load_converted(path)
  except ValueError as e:
    raise UsageError(str(e)) from None
  return Loaded(model, tokenizer, None, "converted")


def converted_tokenizer(path: str) -> HFTokenizer:
  """The tokenizer of a converted checkpoint: ``tokenizer.json`` beside its params."""
  file = os.path.join(path, TOKENIZER_FILE)
  if os.path.isfile(file):
    return HFTokenizer(file)
  config = os.path.join(path, TOKENIZER_CONFIG_FILE)
  named = None
  try:
    with open(config) as f:
      fields = json.load(f)
    named = fields.get("tokenizer_class") or fields.get("name_or_path")
  except (OSError, ValueError, AttributeError):
    pass
  if named:
    raise UsageError(f"{config} names the tokenizer {named!r}, which is not available offline: "
                     f"{path} has no {TOKENIZER_FILE} (copy it from the source checkpoint)")
  raise UsageError(f"{path} records no tokenizer: copy the {TOKENIZER_FILE} the source "
                   f"checkpoint was published with into it")

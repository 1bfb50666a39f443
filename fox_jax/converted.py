"""Converted checkpoints: what ``fox-convert`` writes and ``load_converted`` reads.

An output directory holds ``model_config.json`` (``ModelConfig.to_dict``) and ``params``,
an orbax checkpoint of the model's parameters and constants as nested dicts of arrays.
Both are written into a fresh staging directory and moved into place only once complete,
so a failed or interrupted conversion leaves no half-written output behind (``fox-convert``
turns SIGTERM and SIGINT into an exception for this: ``signals_interrupt``). An output
directory must be absent or empty; with ``overwrite`` it may hold an earlier conversion,
whose two entries are replaced (other files there stay). What counts as an earlier
conversion is recognised positively: a ``model_config.json`` that is a fox-jax ModelConfig
and a ``params`` directory holding the files orbax writes and nothing else. Anything else
in a non-empty directory is refused even with ``overwrite``: it is someone's data.

Staging directories are named ``.<output name>.fox-convert-<host>-<pid>-<random>``. One
left by a run that died (SIGKILL, power loss) on this host, whose process is gone, does
not make its directory non-empty and is removed by the next run; one of a live run, or of
another host, makes the output directory busy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from typing import Optional

import jax
from flax import nnx

from fox_jax.config import ModelConfig
from fox_jax.layers import Constant
from fox_jax.model import DecoderLM
from fox_jax.safetensors_io import brief, read_json_object

MODEL_CONFIG_NAME = "model_config.json"
PARAMS_NAME = "params"


# -- staging directories ------------------------------------------------------------------

_STAGING_TAG = ".fox-convert-"
# ".<name>.fox-convert-<host>-<pid>-<hex>"; host and pid are absent in names written
# before they were recorded.
_STAGING_RE = re.compile(r"\.(?P<base>.*)\.fox-convert-(?:(?P<host>[A-Za-z0-9-]+)-"
                         r"(?P<pid>[0-9]+)-)?[0-9a-f]{32}", re.S)
_RUN_START = time.time()


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "unknown"


def _staging_name(out_dir: str) -> str:
  # The output's name is cut so that the whole name stays within NAME_MAX (255).
  return (f".{os.path.basename(out_dir)[:100]}{_STAGING_TAG}{_host()}-{os.getpid()}-"
          f"{uuid.uuid4().hex}")


def _staging_dirs(directory: str, base: Optional[str] = None) -> list[tuple[str, bool]]:
  """(name, stale) of the staging directories in ``directory`` (those for an output named
  ``base`` only, when given). Stale: left by a process of this host that is gone."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  found = []
  for name in names:
    match = _STAGING_RE.fullmatch(name)
    path = os.path.join(directory, name)
    if (match is None or (base is not None and match["base"] != base[:100])
        or os.path.islink(path) or not os.path.isdir(path)):
      continue
    if match["pid"] is None:  # an older fox-convert's: stale unless made during this run
      try:
        stale = os.stat(path).st_mtime < _RUN_START
      except OSError:
        stale = False
    elif match["host"] != _host() or int(match["pid"]) == os.getpid():
      stale = False  # another machine's process cannot be asked; ours is running
    else:
      try:
        os.kill(int(match["pid"]), 0)
        stale = False
      except (ProcessLookupError, OverflowError):  # gone; a pid no process can have
        stale = True
      except PermissionError:  # alive, another user's
        stale = False
    found.append((name, stale))
  return found


def _remove_stale_staging(directory: str, base: Optional[str] = None) -> None:
  for name, stale in _staging_dirs(directory, base):
    if stale:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


# -- recognising an earlier conversion ----------------------------------------------------

# What orbax's StandardCheckpointer writes (paths relative to params/; OCDBT layout). Any
# other file makes params/ someone else's.
_ORBAX_FILES = re.compile(r"""_CHECKPOINT_METADATA|_METADATA|_ROOT_METADATA|_sharding
    |commit_success\.txt|manifest\.ocdbt|d/[0-9a-f]+|array_metadatas/process_[0-9]+
    |ocdbt\.process_[0-9]+/(manifest\.ocdbt|d/[0-9a-f]+)|descriptor/descriptor\.pbtxt""", re.X)
_ORBAX_DIRS = re.compile(r"d|array_metadatas|ocdbt\.process_[0-9]+(/d)?|descriptor")
_ORBAX_REQUIRED = ("_CHECKPOINT_METADATA", "_METADATA")
_MAX_CONFIG_BYTES = 1 << 20  # a model config is a few hundred bytes


def _not_a_conversion(out_dir: str) -> Optional[str]:
  """None when ``out_dir`` holds what ``save_converted`` writes, else why it does not."""
  config = os.path.join(out_dir, MODEL_CONFIG_NAME)
  if os.path.islink(config) or not os.path.isfile(config):
    return f"no {MODEL_CONFIG_NAME} file"
  try:
    if os.path.getsize(config) > _MAX_CONFIG_BYTES:
      raise ValueError("too large")
    ModelConfig.from_dict(read_json_object(config, "model config"))
  except (ValueError, TypeError, OverflowError, OSError):
    return f"its {MODEL_CONFIG_NAME} is not a fox-jax model config"
  params = os.path.join(out_dir, PARAMS_NAME)
  if os.path.islink(params) or not os.path.isdir(params):
    return f"no {PARAMS_NAME}/ directory"
  for name in _ORBAX_REQUIRED:
    if not os.path.isfile(os.path.join(params, name)):
      return f"{PARAMS_NAME}/ has no {name}, so orbax did not write it"
  try:
    # onerror: a folder that cannot be listed could hold anything
    for root, dirs, files in os.walk(params, onerror=_raise):
      rel = os.path.relpath(root, params)
      for names, pattern in ((dirs, _ORBAX_DIRS), (files, _ORBAX_FILES)):
        for name in names:
          path = name if rel == "." else os.path.join(rel, name)
          if os.path.islink(os.path.join(root, name)) or not pattern.fullmatch(path):
            return f"{brief(os.path.join(PARAMS_NAME, path), 100)} is not something orbax writes"
  except OSError as e:
    return f"{PARAMS_NAME}/ cannot be read: {e.strerror}"
  return None


def _raise(error: OSError):
  raise error


def check_output_dir(out_dir: str, overwrite: bool) -> None:
  """ValueError unless ``out_dir`` may receive a conversion: absent, empty (stale staging
  directories aside), or (with ``overwrite``) holding an earlier one, recognised as the
  module docstring says. Anything else is refused even with ``overwrite``: it is someone's
  data, not a conversion."""
  if not os.path.isdir(out_dir):
    if os.path.lexists(out_dir):
      raise ValueError(f"{out_dir}: exists and is not a directory")
    ancestor = os.path.dirname(out_dir)
    while not os.path.lexists(ancestor):
      ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
      raise ValueError(f"{out_dir}: cannot be created, {ancestor} is not a directory")
    return
  staging = _staging_dirs(out_dir)
  busy = [name for name, stale in staging if not stale]
  if busy:
    raise ValueError(f"{out_dir}: another fox-convert is writing here ({brief(busy[0], 120)}); "
                     "wait for it, or remove that directory if no conversion is running")
  if not set(os.listdir(out_dir)) - {name for name, _ in staging}:
    return
  why = _not_a_conversion(out_dir)
  if why is not None:
    raise ValueError(f"{out_dir}: not empty and holds no earlier conversion ({why}); choose "
                     "a new or empty directory")
  if not overwrite:
    raise ValueError(f"{out_dir}: already holds a conversion; pass --overwrite "
                     "(overwrite=True in Python) to replace it")


def _make_dirs(path: str, created: list) -> None:
  """``os.makedirs(path)`` that records in ``created`` each directory it makes."""
  missing = []
  while not os.path.lexists(path):
    missing.append(path)
    path = os.path.dirname(path)
  for d in reversed(missing):
    os.mkdir(d)
    created.append(d)


def _move_into_place(staging: str, out_dir: str, existed: bool) -> None:
  if not existed:
    os.rename(staging, out_dir)
    return
  params, replaced = os.path.join(out_dir, PARAMS_NAME), os.path.join(staging, "replaced")
  had_params = os.path.lexists(params)
  if had_params:  # removed with the staging directory once the new params are in place
    os.rename(params, replaced)
  try:
    os.rename(os.path.join(staging, PARAMS_NAME), params)
  except OSError:
    if had_params:
      os.rename(replaced, params)
    raise
  os.replace(os.path.join(staging, MODEL_CONFIG_NAME), os.path.join(out_dir, MODEL_CONFIG_NAME))


# -- signals ------------------------------------------------------------------------------

class Interrupted(BaseException):
  """SIGTERM or SIGINT under ``signals_interrupt``. A BaseException, like
  KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum

  def __str__(self):
    return f"interrupted by {signal.Signals(self.signum).name}"


_critical_depth = 0
_pending: list[int] = []


def _on_signal(signum, frame):
  if _critical_depth:  # moving into place or cleaning up: raised when that is done
    _pending.append(signum)
    return
  raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt():
  """While active, SIGTERM and SIGINT raise ``Interrupted`` in the main thread, so that a
  conversion being staged is removed as after any other failure (the default SIGTERM
  action kills the process and leaves the staging directory behind). A signal during a
  move into place or a cleanup is held until that finishes. Elsewhere than in the main
  thread, where handlers cannot be set, this does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    _pending.clear()


@contextlib.contextmanager
def _critical():
  """Holds ``Interrupted`` back (in the main thread) until the block is done."""
  global _critical_depth
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  _critical_depth += 1
  try:
    yield
  finally:
    _critical_depth -= 1
  # reached only when the block succeeded; after a failure the signal waits for the next
  # block, the cleanup
  if not _critical_depth and _pending:
    signum = _pending[0]
    _pending.clear()
    raise Interrupted(signum)


# -- staged output ------------------------------------------------------------------------

@contextlib.contextmanager
def staged_output(out_dir: str, overwrite: bool):
  """Yields an empty staging directory; when the body succeeds, its MODEL_CONFIG_NAME and
  PARAMS_NAME move into ``out_dir``.

  The staging directory is a sibling of a new ``out_dir`` (renamed into place at the end),
  or lies inside an existing one (so that a directory the user made keeps its identity and
  permissions). On failure, ``Interrupted`` included, it is removed, with any parent
  directories this call created; a directory that existed before is never removed. Stale
  staging directories of dead runs are removed first. An OSError in the body is reported
  as a ValueError naming ``out_dir``.
  """
  out_dir = os.path.abspath(out_dir)
  check_output_dir(out_dir, overwrite)
  existed = os.path.isdir(out_dir)
  created = []
  parent = out_dir if existed else os.path.dirname(out_dir)
  # mkdir (not tempfile.mkdtemp, whose mode is 0700) so that a renamed staging directory
  # gets the permissions a new directory would.
  staging = os.path.join(parent, _staging_name(out_dir))
  made = finished = False
  try:
    with _critical():  # no signal between making a directory and recording it
      try:
        if existed:
          _remove_stale_staging(out_dir)
        elif os.path.isdir(parent):
          _remove_stale_staging(parent, os.path.basename(out_dir))
        _make_dirs(parent, created)
        os.mkdir(staging)
        made = True
      except OSError as e:  # e.g. no permission to write in the parent
        where = os.path.dirname(e.filename) if e.filename == staging else e.filename
        raise ValueError(f"{out_dir}: cannot be written ({e.strerror}: {where})") from None
    try:
      yield staging
    except OSError as e:  # the body writes the conversion: report the output directory
      raise ValueError(f"{out_dir}: cannot write the conversion ({e.strerror or e})") from e
    with _critical():  # no signal between the renames
      try:
        _move_into_place(staging, out_dir, existed)
      except OSError as e:
        raise ValueError(f"{out_dir}: cannot move the conversion into place ({e.strerror}: "
                         f"{e.filename})") from None
      finished = True
  finally:
    with _critical():
      if made:
        shutil.rmtree(staging, ignore_errors=True)
      if not finished:
        _remove_dirs(created)


def _remove_dirs(created: list) -> None:
  for d in reversed(created):
    try:
      os.rmdir(d)
    except OSError:  # no longer empty: something else wrote there meanwhile
      pass


def write_conversion(directory: str, cfg: ModelConfig, model: DecoderLM) -> None:
  import orbax.checkpoint as ocp
  with open(os.path.join(directory, MODEL_CONFIG_NAME), "w") as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
  state = nnx.to_pure_dict(nnx.state(model, (nnx.Param, Constant)))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_NAME), state)


def save_converted(out_dir: str, cfg: ModelConfig, model: DecoderLM, *,
                   overwrite: bool = False) -> None:
  """Writes ``model_config.json`` and an orbax checkpoint ``params`` (parameters and
  constants, as nested dicts of arrays) into ``out_dir``.

  ``out_dir`` must be absent or empty; ``overwrite`` also allows one holding an earlier
  conversion, whose two entries are then replaced (other files there are kept). Nothing is
  left behind when writing fails. Raises ValueError naming the directory otherwise.
  """
  with staged_output(out_dir, overwrite) as staging:
    write_conversion(staging, cfg, model)


def _shapes(tree) -> dict[str, tuple]:
  return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_stored_shapes(metadata, target) -> None:
  """ValueError unless the stored parameters are the ``target``'s names and shapes."""
  stored = _shapes(getattr(metadata, "item_metadata", metadata))
  if not stored:
    raise ValueError("no parameters could be read: damaged, or not an orbax checkpoint")
  needed = _shapes(target)
  for name in sorted(set(stored) | set(needed)):
    if name not in stored:
      raise ValueError(f"parameter {name} (shape {needed[name]}) is not stored")
    if name not in needed:
      raise ValueError(f"stored parameter {name} is not in the model")
    if stored[name] != needed[name]:
      raise ValueError(f"parameter {name} is stored with shape {stored[name]}, the model "
                       f"needs {needed[name]}")


def load_converted(out_dir: str, **overrides) -> tuple[ModelConfig, DecoderLM]:
  """Reads what ``save_converted`` (``fox-convert``) wrote; returns (config, model).

  A missing directory or file, a model config that is not a valid ModelConfig, or params
  that do not restore as that model are a ValueError naming the file; ``overrides``
  replace config fields (``attn_impl``, ...).
  """
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  config_path = os.path.join(out_dir, MODEL_CONFIG_NAME)
  params = os.path.join(out_dir, PARAMS_NAME)
  if not os.path.isdir(out_dir):
    raise ValueError(f"{out_dir}: no such directory")
  for path, present in ((config_path, os.path.isfile), (params, os.path.isdir)):
    if not present(path):
      raise ValueError(f"{out_dir}: no {os.path.basename(path)} (not written by fox-convert?)")
  fields = read_json_object(config_path, "model config")
  try:
    cfg = ModelConfig.from_dict(fields)
  except (ValueError, TypeError) as e:  # TypeError: a field of the wrong type
    raise ValueError(f"{config_path}: not a valid ModelConfig: {e}") from None
  if overrides:
    cfg = cfg.replace(**overrides)
  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      # Shapes first: orbax's own mismatch error is a page long and leaves pending reads.
      _check_stored_shapes(ckptr.metadata(params), target)
      restored = ckptr.restore(params, target)
  except (ValueError, OSError) as e:  # damaged files
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"{params}: cannot be restored as the model {MODEL_CONFIG_NAME} "
                     f"describes ({detail[:300]})") from e
  nnx.replace_by_pure_dict(state, restored)
  return cfg, nnx.merge(graphdef, state)

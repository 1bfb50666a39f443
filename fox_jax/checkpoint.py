"""Orbax checkpoints of the whole training state in ``<run>/checkpoints``, and their integrity.

A checkpoint holds the train state (parameters, optimizer state, step, RNG key) as sharded
arrays, restored straight onto the mesh's shardings, a small JSON item with the data
position (rows consumed) and the step, and the data loader's state
(``fox_jax.data.loader``), one JSON file per process written by grain's orbax handler
(``data/process_<i>-of-<n>.json``), so a resumed run reads the same rows next.

Integrity: once a save is complete, process 0 writes ``integrity.json`` into the step's
directory: the size and SHA-256 of every file orbax wrote. A restore checks them first, so
a truncated, missing or altered file is found before orbax reads it (and before it could
load altered numbers without noticing), and the message names the file. A checkpoint
without the record (a process killed between orbax's commit and the record) is tried as it
is. :meth:`Checkpointer.restore_latest` falls back to the newest checkpoint that restores
and names each broken one; nothing is ever deleted: once a checkpoint has restored, a
training run moves the broken ones newer than it to ``<run>/broken_checkpoints/`` (so that
their steps can be saved again), an evaluation leaves them where they are. If none
restores, nothing is moved.

Saves are asynchronous; a save that fails (a full disk, a lost mount) raises
:class:`CheckpointSaveError` at the next save, check or close, naming the step and the
directory. Orbax writes a step under a temporary name and renames it only when complete,
and removes old checkpoints only after a new one is complete, so a failed save leaves the
earlier checkpoints as they were.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from fox_jax.errors import RunError, UsageError

INTEGRITY_FILE = "integrity.json"
UNRECORDED = "no integrity record"
BROKEN_DIR = "broken_checkpoints"


def _reason(e: BaseException) -> str:
  """The first line of an exception's message, short enough for a one-line report."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  # TensorStore appends the repr of a bound method ("See full TensorStore details: ...").
  text = text.split(" See full TensorStore details")[0]
  return text if len(text) <= 300 else text[:297] + "..."


# Set once an orbax read or write has failed in this process (and was reported).
_io_failed = False


def _filter_io_echoes() -> None:
  """Drops the echoes of a failed orbax read or write (installed once, chained).

  When one read or write of a checkpoint fails, orbax raises that error (which we report in
  one line) and abandons the others: TensorStore then completes each pending operation
  into a closed event loop ("Event loop is closed"), and each abandoned coroutine of orbax
  carries its own copy of the error to the garbage collector. Both are reported as
  unraisable, one traceback each: hundreds for a full disk or a truncated file. After a
  failure has been reported, these echoes are dropped; anything else goes to the hook that
  was installed before.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_fox_filter", False):
    return

  def hook(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    code = getattr(unraisable.object, "cr_code", None)
    if _io_failed and code is not None and "orbax" in code.co_filename:
      return
    previous(unraisable)
  hook._fox_filter = True
  sys.unraisablehook = hook


class _DropIOEchoes(logging.Filter):
  """asyncio logs 'Task exception was never retrieved' for each abandoned orbax task."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (_io_failed and "exception was never retrieved" in record.getMessage())


def _failed() -> None:
  global _io_failed
  if not _io_failed:
    _io_failed = True
    logging.getLogger("asyncio").addFilter(_DropIOEchoes())
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)


class CheckpointSaveError(RunError):
  def __init__(self, step: int, directory: str, cause: BaseException, kept: Optional[int]):
    _failed()
    self.step = step
    kept_msg = f"newest intact checkpoint: step {kept}" if kept is not None else "no earlier checkpoint"
    super().__init__(f"saving checkpoint step {step} in {directory} failed ({_reason(cause)}); "
                     f"earlier checkpoints are kept ({kept_msg})")


class BrokenCheckpoint(Exception):
  """A checkpoint that cannot be restored: ``step``, its ``path`` and the ``reason``."""

  def __init__(self, step: int, path: str, reason: str):
    _failed()
    self.step, self.path, self.reason = step, path, reason
    super().__init__(f"checkpoint step {step} ({path}) cannot be restored: {reason}")


class Vanished(Exception):
  """A checkpoint removed while it was read (a run training in the same directory keeps
  only its newest checkpoints)."""

  def __init__(self, step: int):
    self.step = step
    super().__init__(f"checkpoint step {step} was removed while it was read")


class Restored(NamedTuple):
  step: int
  state: Any
  meta: dict


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(directory: str) -> list[str]:
  out = []
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if rel != INTEGRITY_FILE:
        out.append(rel)
  return sorted(out)


def write_integrity(step_dir: str) -> None:
  from fox_jax.rundir import atomic_write
  record = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                  "sha256": _sha256(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
  atomic_write(os.path.join(step_dir, INTEGRITY_FILE), json.dumps(record, indent=0) + "\n")


def check_integrity(step_dir: str) -> Optional[str]:
  """None if every recorded file is there unchanged, :data:`UNRECORDED` if nothing is
  recorded, else what is wrong."""
  path = os.path.join(step_dir, INTEGRITY_FILE)
  if not os.path.exists(path):
    return UNRECORDED
  try:
    with open(path) as f:
      record = json.load(f)
    items = [(rel, int(info["size"]), str(info["sha256"])) for rel, info in record.items()]
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return f"its {INTEGRITY_FILE} is damaged"
  for rel, size, digest in items:
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"{rel} is missing"
    try:
      actual = os.path.getsize(full)
      if actual != size:
        return f"{rel} has {actual} bytes, {size} were saved"
      if _sha256(full) != digest:
        return f"{rel} differs from what was saved"
    except OSError as e:
      return f"{rel} cannot be read ({e.strerror})"
  return None


class Checkpointer:
  """Saves every ``save`` call's state; keeps the newest ``keep`` checkpoints.

  ``read_only`` (evaluation): creates nothing and never saves.
  """

  def __init__(self, workdir: str, keep: int = 1, *, read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.read_only = read_only
    self._pending: Optional[int] = None
    self._manager = None
    _filter_io_echoes()
    if read_only and not os.path.isdir(self.directory):
      return
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only)
    import grain.checkpoint
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps()) if self._manager is not None else []

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  # --------------------------------------------------------------------------- saving

  def save(self, step: int, state: Any, meta: dict, data_state: Optional[bytes] = None) -> None:
    """Saves ``state``, ``meta`` and this process's data-loader state (bytes) at ``step``."""
    self._finish_pending()
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_state is not None:
      import grain.checkpoint
      items["data"] = grain.checkpoint.CheckpointSave(_SavedState(data_state))
    try:
      self._manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointSaveError(step, self.directory, e, self.latest_step()) from e
    self._pending = step

  def check(self) -> None:
    """Raises CheckpointSaveError if the save in flight has failed; records the integrity
    of one that has completed (no waiting either way), so that the newest checkpoint is
    checked on resume even when the process is killed before its next save. With several
    processes the record waits for the next save, where all of them wait together."""
    if self._pending is None:
      return
    try:
      self._manager.check_for_errors()
    except Exception as e:
      step, self._pending = self._pending, None
      raise CheckpointSaveError(step, self.directory, e, self._newest_other(step)) from e
    if jax.process_count() == 1 and not self._manager.is_saving_in_progress():
      self._finish_pending()

  def _newest_other(self, step: int) -> Optional[int]:
    steps = [s for s in self.all_steps() if s != step]
    return steps[-1] if steps else None

  def _finish_pending(self) -> None:
    """Waits for the save in flight; records its integrity (process 0)."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
      if step not in self._manager.all_steps():
        raise RuntimeError("orbax did not commit it")
      if jax.process_index() == 0:
        write_integrity(self.step_dir(step))
    except Exception as e:
      raise CheckpointSaveError(step, self.directory, e, self._newest_other(step)) from e

  def wait(self) -> None:
    self._finish_pending()

  def close(self) -> None:
    if self._manager is None:
      return
    try:
      self._finish_pending()
    finally:
      try:
        self._manager.close()
      except Exception:  # a failed save was reported above; closing must not hide it
        pass
      self._manager = None

  # --------------------------------------------------------------------------- restoring

  def data_state(self, step: int) -> Optional[bytes]:
    """This process's data-loader state saved at ``step`` (None: the checkpoint has none
    for this process, e.g. it was written before loaders saved one, or by another number
    of processes)."""
    path = os.path.join(self.step_dir(step), "data",
                        f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError:
      return None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of ``step``; arrays land on the shardings of ``abstract_state``.

    Raises BrokenCheckpoint when the files are damaged, or when orbax cannot read a
    checkpoint whose files are not recorded. A checkpoint whose files are intact but that
    does not fit ``abstract_state`` (another model) is not broken: UsageError.
    """
    path = self.step_dir(step)
    damage = check_integrity(path) if jax.process_index() == 0 else UNRECORDED
    if damage not in (None, UNRECORDED):
      if not os.path.isdir(path):
        raise Vanished(step)
      raise BrokenCheckpoint(step, path, damage)
    try:
      got = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      meta = dict(got.meta)
      int(meta["data_position"])
    except Exception as e:
      if not os.path.isdir(path):
        _failed()
        raise Vanished(step) from e
      if damage is None:
        _failed()
        raise UsageError(f"checkpoint step {step} ({path}) is intact but does not restore "
                         f"into this config: {_reason(e)}") from e
      raise BrokenCheckpoint(step, path, _reason(e)) from e
    return got.state, meta

  def restore_latest(self, abstract_state: Any) -> tuple[Optional[Restored], list[BrokenCheckpoint]]:
    """(the newest checkpoint that restores, the broken ones newer than it).

    (None, []) if there is no checkpoint; UsageError naming every broken one if none
    restores. Nothing is moved here. A checkpoint that restores but carries no integrity
    record (its process was killed between orbax's commit and the record) gets one now.
    With several processes, process 0 picks the step from the integrity records and the
    others follow it, so that every process restores the same step.
    """
    steps = self.all_steps()
    if jax.process_count() > 1:
      return self._restore_agreed(steps, abstract_state)
    broken = []
    retries = 3
    while steps:
      step = steps.pop()
      try:
        state, meta = self.restore(step, abstract_state)
      except BrokenCheckpoint as e:
        broken.append(e)
        continue
      except Vanished:
        if not retries:
          raise UsageError(f"the checkpoints in {self.directory} keep being replaced while "
                           f"they are read; try again") from None
        retries -= 1
        self._manager.reload()
        steps = [s for s in self.all_steps() if s not in {b.step for b in broken}]
        continue
      if not self.read_only and check_integrity(self.step_dir(step)) == UNRECORDED:
        write_integrity(self.step_dir(step))
      return Restored(step, state, meta), broken
    if broken:
      raise UsageError(f"no checkpoint in {self.directory} can be restored; nothing was "
                       f"changed: " + "; ".join(f"step {b.step}: {b.reason}" for b in broken))
    return None, []

  def saved_config(self) -> Optional[dict]:
    """The config stored with the newest checkpoint whose meta is readable, or None."""
    for step in reversed(self.all_steps()):
      try:
        got = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        config = dict(got.meta).get("config")
      except Exception:
        continue
      if isinstance(config, dict):
        from fox_jax import run_config
        return run_config.config_from_json(json.dumps(config), self.step_dir(step))
    return None

  def _restore_agreed(self, steps, abstract_state):
    from jax.experimental import multihost_utils
    chosen, broken = -1, []
    if jax.process_index() == 0:
      for step in reversed(steps):
        damage = check_integrity(self.step_dir(step))
        if damage in (None, UNRECORDED):
          chosen = step
          break
        broken.append(BrokenCheckpoint(step, self.step_dir(step), damage))
    chosen = int(multihost_utils.broadcast_one_to_all(np.int64(chosen)))
    if chosen < 0:
      if steps:
        raise UsageError(f"no checkpoint in {self.directory} can be restored")
      return None, []
    try:
      got = self._manager.restore(chosen, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise UsageError(f"checkpoint step {chosen} ({self.step_dir(chosen)}) cannot be "
                       f"restored: {_reason(e)}") from e
    return Restored(chosen, got.state, dict(got.meta)), broken

  def move_aside(self, step: int) -> str:
    """Moves a broken checkpoint to ``<run>/broken_checkpoints/<step>`` (never deletes it)."""
    target_dir = os.path.join(self.workdir, BROKEN_DIR)
    if os.path.exists(target_dir) and not os.path.isdir(target_dir):
      raise UsageError(f"cannot move broken checkpoint step {step}: {target_dir} is not a directory")
    os.makedirs(target_dir, exist_ok=True)
    target, n = os.path.join(target_dir, str(step)), 1
    while os.path.exists(target):
      n += 1
      target = os.path.join(target_dir, f"{step}-{n}")
    shutil.move(self.step_dir(step), target)
    self._manager.reload()
    return target


class _SavedState:
  """A data-loader state taken when the save was asked for, for grain's orbax handler
  (which reads ``get_state()`` as bytes, possibly after the loader has moved on)."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` (arrays or structs) carrying ``shardings``."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)

"""The run directory's own files: its lock, its saved config and the config's history.

  .fox-train.lock        held (flock) by the one fox-train process using the directory
  config.json            the resolved config the checkpoints were trained with
  config_history.jsonl   one line per resume that changed an allowed field (what, at which step)

Every file is replaced atomically (written beside it, then renamed), so a process killed at
any moment leaves either the old or the new version, never a torn one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from typing import Any, Mapping, Optional

import ml_collections

from fox_jax import run_config
from fox_jax.errors import UsageError

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = ".fox-train.lock"


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, text: str) -> None:
  """Replaces ``path`` with ``text``: a temporary file beside it, fsynced, then renamed.

  The file gets the permissions a plain ``open`` would give it (0666 less the umask), not
  the 0600 of a temporary file, so that others who read the run directory still can.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


class RunLock:
  """An exclusive lock on a run directory, so that two processes never train in it at once.

  ``flock`` on ``.fox-train.lock``: the kernel releases it when the holder exits, however it
  exits (``kill -9`` included), so a lock file left behind by a dead process is never a held
  lock and is simply taken over. The file records who holds it, for the message.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None

  def acquire(self) -> "RunLock":
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise UsageError(f"{self.workdir} is in use by another fox-train ({holder}); "
                           f"wait for it to finish or stop it first") from None
        raise UsageError(f"cannot lock {self.path}: {e.strerror}") from None
      # The previous holder unlinks the file when it releases; if it did so between our
      # open and our flock, we hold a lock on a file nobody else will see: start over.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      holder = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
      os.ftruncate(fd, 0)
      os.write(fd, (json.dumps(holder) + "\n").encode())
      self._fd = fd
      return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"pid {info['pid']} on {info['host']}, since {info['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown"


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in ``workdir``; UsageError if there is none or it is unreadable."""
  path = config_path(workdir)
  if not os.path.isdir(workdir):
    raise UsageError(f"no such run directory: {workdir}")
  if not os.path.isfile(path):
    raise UsageError(f"{workdir} is not a fox-train run directory (no {CONFIG_FILE})")
  try:
    with open(path) as f:
      text = f.read()
  except OSError as e:
    raise UsageError(f"cannot read {path}: {e.strerror}") from None
  return run_config.config_from_json(text, path)


def save_config(c: ml_collections.ConfigDict, workdir: str) -> None:
  atomic_write(config_path(workdir), run_config.config_to_json(c))


def record_changes(workdir: str, step: int, changes: Mapping[str, tuple[Any, Any]]) -> None:
  """Appends one line ``{"step", "time", "changed": {field: [old, new]}}`` to the history."""
  line = json.dumps({"step": int(step), "time": time.time(),
                     "changed": {k: list(v) for k, v in changes.items()}})
  with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


def _records(path: str):
  if not os.path.exists(path):
    return
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        yield record


def _step(record: dict) -> Optional[int]:
  step = record.get("step")
  return step if isinstance(step, int) and not isinstance(step, bool) else None


def last_logged_step(path: str) -> int:
  """The largest step in a metrics file (0 if there is none)."""
  return max((_step(r) or 0 for r in _records(path)), default=0)


def logged_value(path: str, step: int, key: str):
  """The last ``key`` logged at ``step`` in a metrics file, or None."""
  found = None
  for r in _records(path):
    if _step(r) == step and key in r:
      found = r[key]
  return found


def truncate_jsonl(path: str, step: int) -> int:
  """Drops the lines of a metrics file logged after ``step`` (and a torn last line).

  A run killed after its last checkpoint logged steps it will repeat on resume; the
  resumed run writes them again. Lines without an integer step (not written by fox-train)
  are kept. Returns the number of lines dropped.
  """
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    logged = _step(record) if isinstance(record, dict) else None
    if logged is None or logged <= step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) != len(lines):
    atomic_write(path, "".join(keep))
  return len(lines) - len(keep)

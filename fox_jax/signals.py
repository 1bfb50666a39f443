"""SIGTERM and SIGINT for ``fox-train``: a stop with a message, never a silent kill.

Imports nothing heavy, so that ``fox-train`` installs the handlers before it imports JAX.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Optional


class Interrupted(BaseException):
  """SIGTERM or SIGINT during start-up (not an Exception: no handler may swallow it)."""

  def __init__(self, signal_name: str):
    self.signal_name = signal_name
    super().__init__(signal_name)


class StopSignals:
  """SIGTERM and SIGINT (Ctrl-C) for a training run.

  During start-up (building, restoring, compiling) either stops the process at once with
  :class:`Interrupted`: nothing is in flight and nothing needs saving. Inside
  :meth:`deferred` (the training loop) the first one only sets ``received``; the loop
  finishes the step in flight, saves a checkpoint and returns. A second Ctrl-C there stops
  at once (KeyboardInterrupt), keeping the checkpoints already saved. Handlers can only be
  installed from the main thread; elsewhere the signals keep their default action.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[str] = None
    self._deferred = False
    self._previous: dict = {}

  def __enter__(self) -> "StopSignals":
    for sig in self._SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if not self._deferred:
      raise Interrupted(name)
    if self.received is None:
      self.received = name
    elif signum == signal.SIGINT:
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def deferred(self):
    self._deferred = True
    try:
      yield self
    finally:
      self._deferred = False

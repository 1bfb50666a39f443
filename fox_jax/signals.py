"""SIGTERM and SIGINT for ``fox-train``: a stop with a message, never a silent kill.

Imports nothing heavy, so that ``fox-train`` installs the handlers before it imports JAX.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional


class Interrupted(BaseException):
  """SIGTERM or SIGINT during start-up, raised at the next safe point (not an Exception,
  so that no handler on the way swallows it)."""

  def __init__(self, signal_name: str):
    self.signal_name = signal_name
    super().__init__(signal_name)


class StopSignals:
  """SIGTERM and SIGINT (Ctrl-C) for a training run.

  The handler only records the first signal: raising from a handler could land anywhere
  (inside orbax while it reads a checkpoint, inside a JAX callback) and turn a stop into
  a wrong diagnosis or a crash. Start-up calls :meth:`check` between its phases, which
  raises :class:`Interrupted` once a signal has come; the training loop reads
  ``received`` between steps, finishes the step in flight, saves and returns. A second
  Ctrl-C stops at once (KeyboardInterrupt), keeping the checkpoints already saved.
  Handlers can only be installed from the main thread; elsewhere the signals keep their
  default action.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, exit_on_second: bool = False):
    self.received: Optional[str] = None
    self.exit_on_second = exit_on_second
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
    if self.received is None:
      self.received = signal.Signals(signum).name
    elif signum == signal.SIGINT:
      if self.exit_on_second:
        sys.stderr.write("fox-train: stopped by a second SIGINT without saving; the "
                         "checkpoints saved before it are kept\n")
        sys.stderr.flush()
        os._exit(130)
      raise KeyboardInterrupt

  def check(self) -> None:
    """Raises Interrupted if a signal has come (a safe point of start-up)."""
    if self.received is not None:
      raise Interrupted(self.received)

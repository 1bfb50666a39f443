"""The two kinds of failure the command line reports in one line instead of a traceback.

``UsageError``: the input cannot be used (a config field, a path, a run directory held by
another process); nothing was started or changed, and the command exits 2.
``RunError``: a run that started could not go on (a non-finite step, a checkpoint that
could not be saved); what was saved before is kept, and the command exits 1.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
  """The user's input (config, flags, paths, run directory) cannot be used."""


class RunError(RuntimeError):
  """A started run had to stop; its message says what is kept and where."""

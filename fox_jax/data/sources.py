"""Text files as documents: the interpreter's standard library and a user's files.

:class:`TextFiles` is the :class:`~fox_jax.data.source.DataSource` of the 'builtin' and
'text' sources: one document per file, read when asked for, split into train and held-out
by a stable hash of the file's path relative to its root (unless the held-out files are
given apart), so the split does not depend on file order, the machine or the number of
files. :class:`Corpus` is a split tokenized into memory (evaluation, the 'packed' loader).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
from typing import Sequence

import numpy as np

from fox_jax.data import tokenizer
from fox_jax.data.source import SPLITS, heldout_fraction_of, split_of  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Corpus:
  """All documents of one split as one flat token array.

  Attributes:
    tokens: [N] uint16, documents back to back, each as BOS + bytes + EOS.
    doc_starts: [D + 1] int64 offsets of the documents in ``tokens`` (last = N).
    names: [D] the documents' relative paths, in the same order.
  """
  tokens: np.ndarray
  doc_starts: np.ndarray
  names: tuple[str, ...]

  @property
  def num_docs(self) -> int:
    return len(self.names)

  @property
  def doc_lengths(self) -> np.ndarray:
    return np.diff(self.doc_starts)

  @classmethod
  def of(cls, chunks: Sequence[np.ndarray], names: Sequence[str]) -> "Corpus":
    """The corpus of tokenized documents ``chunks`` (uint16 ids when they fit)."""
    top = max(int(np.max(c)) if len(c) else 0 for c in chunks)
    dtype = np.uint16 if top < 2**16 else np.uint32
    starts = np.zeros(len(chunks) + 1, np.int64)
    starts[1:] = np.cumsum([len(c) for c in chunks])
    return cls(np.concatenate([np.asarray(c, dtype) for c in chunks]), starts, tuple(names))


class TextFiles:
  """The files of one split as a DataSource of UTF-8 documents (bytes), read when asked for;
  an unreadable file reads as empty (no document).

  files: (relative path, absolute path) pairs; with ``heldout_fraction`` the split keeps the
  files whose relative path hashes into it, without, every file is of ``split``.
  """

  tokenized = False

  def __init__(self, files: Sequence[tuple[str, str]], split: str,
               heldout_fraction: float | None = None):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    self.split = split
    self.files = [f for f in files
                  if heldout_fraction is None or split_of(f[0], heldout_fraction) == split]

  def __len__(self) -> int:
    return len(self.files)

  def name(self, index: int) -> str:
    return self.files[index][0]

  def __getitem__(self, index: int) -> bytes:
    try:
      with open(self.files[index][1], "rb") as f:
        return f.read()
    except OSError:
      return b""


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[tuple[str, str]]:
  """(relative path, absolute path) of every .py file of this interpreter's stdlib.

  Installed third-party packages (site-packages, dist-packages) are not part of it.
  """
  root = stdlib_root()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "dist-packages", "__pycache__"))
    for f in sorted(filenames):
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        found.append((os.path.relpath(path, root), path))
  return found


def text_files(pattern: str) -> list[tuple[str, str]]:
  """(relative path, absolute path) of the non-empty files named by a file, a directory or
  a glob.

  A directory means every regular file below it; a glob is expanded recursively (``**``).
  """
  if os.path.isdir(pattern):
    root = pattern
    paths = [os.path.join(d, f) for d, _, fs in os.walk(pattern) for f in fs]
  elif not glob.has_magic(pattern):
    if not os.path.exists(pattern):
      raise ValueError(f"no such file or directory: {pattern}")
    root, paths = os.path.dirname(pattern) or ".", [pattern]
  else:
    root = _glob_root(pattern)
    paths = glob.glob(pattern, recursive=True)
  paths = sorted(p for p in paths if os.path.isfile(p) and os.path.getsize(p) > 0)
  if not paths:
    if os.path.isdir(pattern):
      raise ValueError(f"directory {pattern} holds no files (none that is not empty)")
    raise ValueError(f"no text files found for {pattern!r} (no file matches it)")
  return [(os.path.relpath(p, root), p) for p in paths]


def _glob_root(pattern: str) -> str:
  parts = []
  for part in pattern.split(os.sep):
    if glob.has_magic(part):
      break
    parts.append(part)
  root = os.sep.join(parts)
  return root if os.path.isdir(root) else (os.path.dirname(root) or ".")


def load_corpus(files: Sequence[tuple[str, str]], split: str, heldout_fraction: float) -> Corpus:
  """Reads and tokenises the files of ``split``; empty or unreadable files are skipped."""
  docs = TextFiles(files, split, heldout_fraction)
  chunks, names = [], []
  for i in range(len(docs)):
    data = docs[i]
    if data:
      chunks.append(tokenizer.encode(data))
      names.append(docs.name(i))
  if not chunks:
    raise ValueError(f"split {split!r} has no documents (heldout_fraction={heldout_fraction})")
  return Corpus.of(chunks, names)

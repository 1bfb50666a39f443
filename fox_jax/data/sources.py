"""Document sources: the interpreter's standard library and plain text files.

Each source yields whole documents (one per file) and splits them into train and held-out
by a stable hash of the file's path relative to its root, so the split does not depend on
file order, the machine or the number of files.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sysconfig
from typing import Sequence

import numpy as np

from fox_jax.data import tokenizer

SPLITS = ("train", "heldout")


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


def heldout_fraction_of(name: str) -> float:
  """A number in [0, 1) fixed by ``name`` alone (first 8 bytes of its SHA-256)."""
  digest = hashlib.sha256(name.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(name: str, heldout_fraction: float) -> str:
  return "heldout" if heldout_fraction_of(name) < heldout_fraction else "train"


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
  """(relative path, absolute path) of the files named by a directory or a glob.

  A directory means every regular file below it; a glob is expanded recursively (``**``).
  """
  if os.path.isdir(pattern):
    root = pattern
    paths = [os.path.join(d, f) for d, _, fs in os.walk(pattern) for f in fs]
  else:
    root = _glob_root(pattern)
    paths = glob.glob(pattern, recursive=True)
  paths = sorted(p for p in paths if os.path.isfile(p))
  if not paths:
    raise ValueError(f"no text files found for {pattern!r}")
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
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  chunks, names = [], []
  for name, path in files:
    if split_of(name, heldout_fraction) != split:
      continue
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError:
      continue
    if data:
      chunks.append(tokenizer.encode(data))
      names.append(name)
  if not chunks:
    raise ValueError(f"split {split!r} has no documents (heldout_fraction={heldout_fraction})")
  starts = np.zeros(len(chunks) + 1, np.int64)
  starts[1:] = np.cumsum([len(c) for c in chunks])
  return Corpus(np.concatenate(chunks), starts, tuple(names))


# data.source -> the (relative path, absolute path) of its files, from the data config.
CORPUS_FILES = {
    "builtin": lambda data_cfg: stdlib_files(),
    "text": lambda data_cfg: text_files(data_cfg.path),
}


def corpus_from_config(data_cfg, split: str) -> Corpus:
  """The corpus named by a data config: ``source`` is 'builtin' or 'text' (``path``); a
  ValueError for a source without documents (a synthetic task)."""
  files = CORPUS_FILES.get(data_cfg.source)
  if files is None:
    raise ValueError(f"data.source {data_cfg.source!r} has no text corpus (sources with "
                     f"one: {', '.join(CORPUS_FILES)})")
  return load_corpus(files(data_cfg), split, data_cfg.heldout_fraction)

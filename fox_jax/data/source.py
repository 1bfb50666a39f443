"""The document source protocol: random access to the documents of one split.

A :class:`DataSource` is what every corpus of ``config.data.source`` opens to (the registry is
``fox_jax.data.datasets.DATASETS``): ``len(source)`` documents of one ``split`` ('train' or
'heldout'), ``source[i]`` the i-th, in a fixed order that depends on the data alone (not on
the machine, the process count or the order files were listed in). A document is either

* text (``source.tokenized`` False): ``bytes`` of UTF-8 text, which the run's tokenizer
  turns into ids (``fox_jax.data.tokenizer``); or
* token ids (``source.tokenized`` True): a 1-D integer numpy array, used as it is (a
  pre-tokenized corpus: LongCrawl64, ArrayRecord shards).

Random access by index is what grain's samplers need (``grain.MapDataset.source``): any
object with ``__len__`` and ``__getitem__`` is a grain source. A source reads a document when
asked for it, so a corpus larger than memory streams.

Splits: a source with a held-out split of its own (a held-out path, a TFDS split,
``heldout.zarr``) opens it; one without splits its documents by a stable hash of each
document's key (:func:`heldout_mask`), so the split does not depend on the machine or on
the number of documents.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence, Union, runtime_checkable

import numpy as np

SPLITS = ("train", "heldout")
Document = Union[bytes, np.ndarray]


@runtime_checkable
class DataSource(Protocol):
  """Random access to the documents of one split (see the module docstring)."""

  split: str        # 'train' or 'heldout'
  tokenized: bool   # documents are token ids (True) or UTF-8 text (False)

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Document:
    ...


class ReopensLazily:
  """Base of a source that reads through an open handle (a reader, a zarr array): pickling
  drops the handle, and :meth:`handle` opens it again (``_open()``) in the process that
  reads, so grain's worker processes get a source without an open file."""

  _handle = None

  def _open(self):
    raise NotImplementedError

  def handle(self):
    if self._handle is None:
      self._handle = self._open()
    return self._handle

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_handle"] = None
    return state


def checked_index(index: int, n: int, what: str) -> int:
  """``index`` into ``n`` items (negative from the end); IndexError naming ``what``."""
  index = int(index)
  if index < 0:
    index += n
  if not 0 <= index < n:
    raise IndexError(f"{what} {index} of {n}")
  return index


def heldout_fraction_of(key: str) -> float:
  """A number in [0, 1) fixed by ``key`` alone (first 8 bytes of its SHA-256)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, heldout_fraction: float) -> str:
  """The split of the document with ``key``: 'heldout' for a ``heldout_fraction`` of keys."""
  return "heldout" if heldout_fraction_of(key) < heldout_fraction else "train"


def heldout_mask(num_docs: int, heldout_fraction: float) -> np.ndarray:
  """[num_docs] bool: document i is held out, decided by a hash of i alone (vectorised
  splitmix64), so a document keeps its split when documents are appended."""
  x = np.arange(num_docs, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(11)).astype(np.float64) / 2.0**53 < heldout_fraction


class Subset:
  """The documents ``indices`` of another source, as a source of ``split``."""

  def __init__(self, parent: DataSource, indices: Sequence[int], split: str):
    self.parent = parent
    self.indices = np.asarray(indices, np.int64)
    self.split = split
    self.tokenized = parent.tokenized

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Document:
    return self.parent[int(self.indices[index])]


def hash_split(source: DataSource, split: str, heldout_fraction: float) -> Subset:
  """The ``split`` of a source without its own held-out documents (:func:`heldout_mask`)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  held = heldout_mask(len(source), heldout_fraction)
  return Subset(source, np.flatnonzero(held if split == "heldout" else ~held), split)

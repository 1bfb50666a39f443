"""Pre-tokenized documents in ArrayRecord shards (the format of grain and MaxText).

Format: each record of a shard is one document's token ids, as raw little-endian integers
of one dtype for the whole corpus (``uint16``, ``uint32`` or ``int32``; the reader must be
told which, default ``uint32``) and nothing else: a document of n tokens is a record of
n x itemsize bytes. Shards are written with ``group_size:1`` (:func:`write_array_record`),
so reading one record decodes only that record.

A corpus is a file, a directory (its ``*.array_record*`` files, sorted by name, not
recursive) or a glob; documents are numbered through the shards in sorted path order.
Opening reads each shard's record count (one footer per shard), nothing else; a record is
read when asked for (``grain.sources.ArrayRecordDataSource``, or array_record's own without
grain). The held-out split is a second corpus (``heldout_pattern``) or, without one, a
stable hash of each document's index (:func:`fox_jax.data.source.hash_split`).
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import os
from typing import Iterable, Sequence

import numpy as np

from fox_jax.data.source import SPLITS, DataSource, ReopensLazily, checked_index, hash_split

DTYPES = ("uint16", "uint32", "int32")
FILE_GLOB = "*.array_record*"


def _dtype(dtype) -> np.dtype:
  """The little-endian numpy dtype of a record's integers; ValueError for another dtype."""
  name = np.dtype(dtype).name if isinstance(dtype, (np.dtype, type)) else str(dtype)
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  return np.dtype(name).newbyteorder("<")


def write_array_record(path: str, documents: Iterable[np.ndarray], dtype="uint32") -> int:
  """Writes ``documents`` (1-D integer arrays of token ids) to the shard ``path``.

  Each document becomes one record of little-endian ``dtype`` integers (module docstring),
  written with ``group_size:1`` so that random access reads one record. A document that is
  not 1-D integer or holds an id outside ``dtype``'s range is a ValueError naming its
  index, and no shard is left behind.

  Args:
    path: the shard to write (its directory must exist); by convention its name holds
      ``.array_record`` (``train-00000-of-00004.array_record``), which is what a directory
      corpus lists.
    documents: the documents, in order.
    dtype: 'uint16', 'uint32' or 'int32'; the reader must be given the same.

  Returns:
    The number of documents written.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  dt = _dtype(dtype)
  info = np.iinfo(dt)
  writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
  if not writer.ok():
    raise OSError(f"cannot write the ArrayRecord file {path}")
  count = 0
  try:
    for doc in documents:
      doc = np.asarray(doc)
      if doc.ndim != 1 or not (np.issubdtype(doc.dtype, np.integer) or doc.size == 0):
        raise ValueError(f"document {count} written to {path} is not a 1-D integer array "
                         f"(dtype {doc.dtype}, shape {doc.shape})")
      if doc.size and (doc.min() < info.min or doc.max() > info.max):
        raise ValueError(f"document {count} written to {path} holds ids outside {dt.name} "
                         f"[{info.min}, {info.max}]: min {doc.min()}, max {doc.max()}")
      writer.write(doc.astype(dt).tobytes())
      count += 1
  except BaseException:
    writer.close()
    os.remove(path)
    raise
  writer.close()
  return count


def shard_paths(pattern: str) -> list[str]:
  """The absolute paths of the shards named by a file, a directory or a glob, sorted.

  Raises:
    FileNotFoundError: ``pattern`` is neither a file, a directory nor a glob.
    ValueError: a directory without ``*.array_record*`` files, a glob matching no file.
  """
  pattern = os.path.expanduser(os.fspath(pattern))
  if os.path.isfile(pattern):
    paths = [pattern]
  elif os.path.isdir(pattern):
    paths = [p for p in glob.glob(os.path.join(glob.escape(pattern), FILE_GLOB))
             if os.path.isfile(p)]
    if not paths:
      raise ValueError(f"{pattern} holds no ArrayRecord files ({FILE_GLOB})")
  elif glob.has_magic(pattern):
    paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not paths:
      raise ValueError(f"no files match {pattern}")
  else:
    raise FileNotFoundError(f"no such file or directory: {pattern}")
  return sorted(os.path.abspath(p) for p in paths)


@dataclasses.dataclass(frozen=True)
class _Shard:
  """One whole shard, as the ``FileInstruction`` protocol of ArrayRecordDataSource (given
  its record count, the data source does not open the file again to count)."""
  filename: str
  skip: int
  take: int
  examples_in_shard: int


def _count_records(path: str) -> int:
  """The number of records of the shard ``path``; ValueError if it is not ArrayRecord."""
  from array_record.python.array_record_module import ArrayRecordReader
  try:
    reader = ArrayRecordReader(path)
  except (RuntimeError, OSError) as e:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(f"{path} is not an ArrayRecord file ({detail})") from None
  try:
    if not reader.ok():
      raise ValueError(f"{path} is not an ArrayRecord file (not a Riegeli/records file)")
    return int(reader.num_records())
  finally:
    try:
      reader.close()
    except RuntimeError:  # closing a reader of a corrupt file re-reports the corruption
      pass


class ArrayRecordSource(ReopensLazily):
  """The documents of a set of ArrayRecord shards (module docstring), read lazily.

  Attributes:
    paths: the shards, absolute, in document order.
    counts: records per shard.
    dtype: the records' integer dtype name.
    split: 'train' or 'heldout'.
  """

  tokenized = True

  def __init__(self, paths: Sequence[str], counts: Sequence[int], dtype: str, split: str):
    self.paths = tuple(paths)
    self.counts = tuple(int(c) for c in counts)
    self.dtype = _dtype(dtype).name
    self.split = split
    self._ends = np.cumsum(self.counts).tolist()

  def _open(self):
    try:  # grain's adds its pipeline statistics to array_record's
      from grain.sources import ArrayRecordDataSource
    except ImportError:
      from array_record.python.array_record_data_source import ArrayRecordDataSource
    return ArrayRecordDataSource(
        [_Shard(p, 0, c, c) for p, c in zip(self.paths, self.counts) if c])

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index: int) -> np.ndarray:
    index = checked_index(index, len(self), "document")
    record = self.handle()[index]
    dt = _dtype(self.dtype)
    if len(record) % dt.itemsize:
      shard = bisect.bisect_right(self._ends, index)
      first = self._ends[shard] - self.counts[shard]
      raise ValueError(f"record {index - first} of {self.paths[shard]} has {len(record)} "
                       f"bytes, not a multiple of {dt.itemsize} ({self.dtype}): were its "
                       f"documents written with another dtype?")
    return np.frombuffer(record, dt).astype(dt.newbyteorder("="), copy=False)


def _open_shards(pattern: str, dtype, split: str) -> ArrayRecordSource:
  paths = shard_paths(pattern)
  counts = [_count_records(p) for p in paths]
  if not sum(counts):
    raise ValueError(f"the ArrayRecord files of {pattern} hold no records")
  return ArrayRecordSource(paths, counts, _dtype(dtype).name, split)


def open_array_record(pattern: str, split: str, *, dtype="uint32", heldout_pattern: str = "",
                      heldout_fraction: float = 0.05) -> DataSource:
  """The ``split`` of a corpus of ArrayRecord shards (module docstring).

  Args:
    pattern: a shard, a directory of shards (``*.array_record*``) or a glob.
    split: 'train' or 'heldout'.
    dtype: the records' integers: 'uint16', 'uint32' or 'int32'.
    heldout_pattern: the held-out corpus (same forms as ``pattern``); empty: the held-out
      split is a ``heldout_fraction`` of ``pattern``'s documents, by a hash of their index.
    heldout_fraction: the share of documents held out when there is no ``heldout_pattern``.

  Returns:
    A tokenized source: document i is a 1-D array of token ids (``dtype``).

  Raises:
    FileNotFoundError: no such file or directory.
    ValueError: a directory without shards, a glob matching nothing, a file that is not
      ArrayRecord, shards without records, a bad argument, an empty split.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  _dtype(dtype)
  if heldout_pattern:
    return _open_shards(heldout_pattern if split == "heldout" else pattern, dtype, split)
  if not 0.0 <= heldout_fraction <= 1.0:
    raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
  source = hash_split(_open_shards(pattern, dtype, "train"), split, heldout_fraction)
  if not len(source):
    raise ValueError(f"split {split!r} of {pattern} has no documents "
                     f"(heldout_fraction={heldout_fraction})")
  return source

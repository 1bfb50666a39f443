"""Loaders: the rows a training run reads each step, with their state for the checkpoint.

A loader gives, step after step, the rows of the global batch that this process holds
(``lanes``: the indices of those rows within a step's ``num_lanes`` = global-batch rows) as
a :class:`~fox_jax.data.packing.Batch` [len(lanes), seq_len], and its state as bytes
(``get_state`` / ``set_state``), which the checkpoint saves per process (grain's orbax
handler, ``fox_jax.checkpoint``), so a resumed run reads on exactly where it stopped.

``LOADERS`` (by ``config.data.loader``, for document sources):

* ``grain`` (:class:`GrainLoader`): grain's dataset API over a
  :class:`~fox_jax.data.source.DataSource`, reading documents when it needs them, so a
  corpus larger than memory streams. Every row of the global batch is a *lane*: the
  documents, shuffled with ``data.seed`` and reshuffled each epoch (grain's index shuffle,
  :meth:`grain.MapDataset.shuffle` then ``repeat``), are dealt to the lanes in turn
  (document k of the stream to lane k mod B); a lane tokenizes its documents, cuts each into
  pieces of at most ``seq_len`` targets (inputs ``t[s:s+n]``, targets ``t[s+1:s+n+1]``,
  consecutive pieces overlapping by one token) and packs them first-fit into rows with
  segment ids and positions (:class:`grain.experimental.FirstFitPackIterDataset`; a full
  piece is a row of its own, short tails share rows). A row therefore depends on its lane
  alone: a process reads only the documents of its rows, and the global batch is the same
  for any number of processes (this is what ``ShardByJaxProcess`` does per process, done per
  row). ``data.workers`` > 0 moves the pipeline into that many worker processes
  (``mp_prefetch``), each reading every ``workers``-th document of each lane; the rows then
  depend on the worker count (as in grain), so it is part of the data order.
* ``packed`` (:class:`RowsLoader` over :class:`~fox_jax.data.packing.PackedDataset`): the
  whole split tokenized in memory and packed per epoch from its document lengths; rows read
  by stream position. Runs saved before config version 3 read this stream.

Row streams (a synthetic task, ``fox_jax.data.mqar``) are read by position with
:class:`RowsLoader` whatever the loader.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import numpy as np

from fox_jax.data import tokenizer
from fox_jax.data.packing import Batch
from fox_jax.data.source import DataSource

DEFAULT_PACKING_BINS = 8


def _grain():
  import grain
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
    flags.FLAGS.mark_as_parsed()
  return grain


class _Tokens:
  """Document -> token ids: text through the tokenizer ``spec`` (BOS + ids + EOS, with the
  tokenizer's own special ids), token ids as they are; an empty text has none. Picklable
  (worker processes load the tokenizer themselves)."""

  def __init__(self, tokenized: bool, tokenizer_spec: str):
    self.tokenized = tokenized
    self.tokenizer_spec = tokenizer_spec

  def __call__(self, doc) -> np.ndarray:
    if self.tokenized:
      return np.asarray(doc).reshape(-1)
    if not doc:
      return np.zeros(0, np.int32)
    return tokenizer.load_tokenizer(self.tokenizer_spec).encode_document(doc)  # cached


def pieces(tokens: np.ndarray, seq_len: int) -> list[dict[str, np.ndarray]]:
  """A document's pieces of at most ``seq_len`` targets: {'inputs', 'targets'} int32."""
  tokens = np.asarray(tokens, np.int32)
  n = len(tokens) - 1
  return [{"inputs": tokens[s:s + min(seq_len, n - s)],
           "targets": tokens[s + 1:s + min(seq_len, n - s) + 1]} for s in range(0, n, seq_len)]


def _flat_map_pieces(seq_len: int):
  grain = _grain()

  class Pieces(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 31

    def flat_map(self, tokens):
      return pieces(tokens, seq_len)

  return Pieces()


def _as_row(packed: dict[str, np.ndarray]) -> Batch:
  segments = np.asarray(packed["inputs_segment_ids"], np.int32)
  return Batch(np.asarray(packed["inputs"], np.int32), np.asarray(packed["targets"], np.int32),
               segments, np.asarray(packed["inputs_positions"], np.int32),
               (segments > 0).astype(np.float32))


def _stack(rows: Sequence[Batch]) -> Batch:
  return Batch(*(np.stack(f) for f in zip(*rows)))


def lane_rows(source: DataSource, tokenizer_spec: str, seq_len: int, *, lane: int = 0,
              num_lanes: int = 1, seed: int = 0, shuffle: bool = True,
              packing_bins: int = DEFAULT_PACKING_BINS, pad_id: int = 0, endless: bool = True,
              read_threads: int = 0):
  """The rows of one lane (endless, or one pass over the documents) as a grain IterDataset
  of :class:`Batch` [seq_len].

  ``read_threads``: threads that read a lane's documents ahead (grain's ReadOptions; 0 reads
  each when it is needed). Grain's default (16 threads, 500 documents ahead) per lane costs
  B x 16 threads and B x 500 buffered documents, and measured slower on local disks
  (``benchmarks/results/data_memory.md``); a network file system may want a few.
  """
  grain = _grain()
  docs = grain.MapDataset.source(source)
  if shuffle:
    docs = docs.shuffle(seed=int(seed) % 2**32)
  if endless:
    docs = docs.repeat(None)
  docs = docs[lane::num_lanes].map(_Tokens(source.tokenized, tokenizer_spec))
  read = grain.ReadOptions(num_threads=int(read_threads),
                           prefetch_buffer_size=max(2, 4 * int(read_threads)))
  cut = grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(read), _flat_map_pieces(seq_len))
  packed = grain.experimental.FirstFitPackIterDataset(
      cut, length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=int(packing_bins), shuffle_bins=shuffle,
      seed=(int(seed) * 1_000_003 + lane) % 2**32,
      padding_struct={"inputs": pad_id, "targets": pad_id})
  return packed.map(_as_row)


class GrainLoader:
  """The ``grain`` loader (module docstring): rows ``lanes`` of each step's ``num_lanes``."""

  def __init__(self, source: DataSource, tokenizer_spec: str, seq_len: int, num_lanes: int,
               lanes: Sequence[int], *, seed: int = 0, packing_bins: int = DEFAULT_PACKING_BINS,
               workers: int = 0, pad_id: int = 0, read_threads: int = 0):
    if len(source) == 0:
      raise ValueError(f"the {source.split} split has no documents")
    self.lanes = [int(j) for j in lanes]
    self.workers = int(workers)
    self._args = (source, tokenizer_spec, int(seq_len), int(num_lanes), int(packing_bins),
                  int(pad_id), int(read_threads))
    self._it = None
    self._build(int(seed))

  def _build(self, seed: int) -> None:
    grain = _grain()
    self.close()
    source, tokenizer_spec, seq_len, num_lanes, bins, pad_id, threads = self._args
    self.seed = seed
    per_lane = [lane_rows(source, tokenizer_spec, seq_len, lane=j, num_lanes=num_lanes,
                          seed=seed, packing_bins=bins, pad_id=pad_id, read_threads=threads)
                for j in self.lanes]
    ds = grain.experimental.ZipIterDataset(per_lane).map(_stack)
    if self.workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
    self._it = iter(ds)
    self._before_last: Optional[bytes] = None

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    self._before_last = self.get_state()
    return next(self._it)

  def get_state(self) -> bytes:
    return json.dumps({"lanes": self.lanes, "workers": self.workers, "seed": self.seed,
                       "grain": self._it.get_state()}).encode()

  def state_before_last(self) -> bytes:
    """The state before the last ``next`` (to save a step whose update was refused)."""
    return self._before_last if self._before_last is not None else self.get_state()

  def set_state(self, state: bytes) -> None:
    """Continues exactly from ``state`` (ValueError if it is another loader's)."""
    got = json.loads(state)
    if not isinstance(got, dict) or "grain" not in got or not isinstance(got.get("seed"), int):
      raise ValueError("it is not the grain loader's" + (
          f" but the packed loader's (row {got['position']})"
          if isinstance(got, dict) and "position" in got else ""))
    for key, mine in (("lanes", self.lanes), ("workers", self.workers)):
      if got.get(key) != mine:
        raise ValueError(f"it was saved for {key} {got.get(key)}, this run has {mine}")
    if got["seed"] != self.seed:
      self._build(got["seed"])
    self._it.set_state(got["grain"])
    self._before_last = None

  def restore(self, state: Optional[bytes], position: int, seed: int) -> Optional[str]:
    """Continues from a checkpoint's ``state``; without one that fits (another loader, batch,
    mesh or worker count), starts anew with a shuffle seeded by (``seed``, ``position``)
    and says so."""
    if state is not None:
      try:
        self.set_state(state)
        return None
      except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        why = f"the checkpoint's data-loader state does not fit ({e})"
    else:
      why = "the checkpoint holds no grain data-loader state"
    self._build(int(np.random.SeedSequence([int(seed), int(position)]).generate_state(1)[0]))
    return (f"{why}; the data stream restarts at row {position} with a new shuffle "
            f"(seed {self.seed}), so documents of the current epoch may repeat")

  def start_prefetch(self) -> None:
    start = getattr(self._it, "start_prefetch", None)
    if start is not None:
      start()

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


class RowsLoader:
  """Rows of a random-access stream (``rows(start, count)``) by position: step k reads rows
  k * num_lanes + lane; the state is the position."""

  def __init__(self, dataset: Any, num_lanes: int, lanes: Sequence[int], position: int = 0):
    self.dataset = dataset
    self.num_lanes = int(num_lanes)
    self.lanes = [int(j) for j in lanes]
    self.position = int(position)
    self._before_last = self.position

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    parts, lanes = [], self.lanes
    i = 0
    while i < len(lanes):  # contiguous runs of lanes in one read each
      j = i
      while j + 1 < len(lanes) and lanes[j + 1] == lanes[j] + 1:
        j += 1
      parts.append(self.dataset.rows(self.position + lanes[i], j - i + 1))
      i = j + 1
    self._before_last = self.position
    self.position += self.num_lanes
    return Batch(*(np.concatenate(f) for f in zip(*parts)))

  def get_state(self) -> bytes:
    return json.dumps({"position": self.position}).encode()

  def state_before_last(self) -> bytes:
    return json.dumps({"position": self._before_last}).encode()

  def set_state(self, state: bytes) -> None:
    self.position = int(json.loads(state)["position"])
    self._before_last = self.position

  def restore(self, state: Optional[bytes], position: int, seed: int) -> Optional[str]:
    """Continues from the checkpoint's row ``position`` (the state says the same); says so
    when the state is another loader's (a run that read the grain loader), whose stream
    this one does not continue."""
    self.position = self._before_last = int(position)
    try:
      got = json.loads(state) if state is not None else None
    except ValueError:
      got = None
    if isinstance(got, dict) and "grain" in got:
      return (f"the checkpoint's data-loader state is the grain loader's, which this loader "
              f"does not continue; it reads its own stream from row {position}, so documents "
              f"of the current epoch may repeat")
    return None

  def start_prefetch(self) -> None:
    pass

  def close(self) -> None:
    pass


class Rows:
  """The first rows of a stream, in memory, with the ``rows(start, count)`` / ``seq_len``
  interface (held-out rows for the validation loss)."""

  def __init__(self, batch: Batch):
    self.batch = batch
    self.seq_len = int(batch.inputs.shape[1])

  def __len__(self) -> int:
    return int(self.batch.inputs.shape[0])

  def rows(self, start: int, count: int) -> Batch:
    if start + count > len(self):
      raise IndexError(f"rows {start}..{start + count - 1} of {len(self)}")
    return Batch(*(x[start:start + count] for x in self.batch))


def first_rows(source: DataSource, tokenizer_spec: str, seq_len: int, count: int, *,
               packing_bins: int = DEFAULT_PACKING_BINS, pad_id: int = 0) -> Rows:
  """The first ``count`` rows of ``source``'s documents in order, unshuffled and packed (the
  held-out rows); a split with fewer rows repeats them."""
  got = []
  for row in lane_rows(source, tokenizer_spec, seq_len, shuffle=False,
                       packing_bins=packing_bins, pad_id=pad_id, endless=False):
    got.append(row)
    if len(got) == count:
      break
  if not got:
    raise ValueError(f"the {source.split} split has no documents of two tokens or more")
  return Rows(_stack([got[i % len(got)] for i in range(int(count))]))

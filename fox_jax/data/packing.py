"""Packing documents into fixed-length rows with segment ids and positions.

Each document (BOS + bytes + EOS) of n tokens has n - 1 next-token targets. They are cut
into pieces of at most ``seq_len`` targets; a piece never spans two documents and a row
holds whole pieces, each with its own segment id, so attention restricted to equal
segment ids never crosses a document. Positions restart at 0 in every piece.

The plan of an epoch (which pieces go in which row) is a pure function of (seed, epoch),
so row r of the infinite stream can be rebuilt at any time: the data position saved in a
checkpoint is just the number of rows consumed.
"""

from __future__ import annotations

import bisect
import functools
from typing import NamedTuple

import numpy as np

from fox_jax.data import tokenizer
from fox_jax.data.sources import Corpus

# How many partially filled rows the first-fit packer keeps open.
_OPEN_ROWS = 16


class Batch(NamedTuple):
  """Rows of tokens; all fields [..., T], int32 but ``weights`` float32.

  inputs: token ids; targets: next tokens (PAD where there is none); segment_ids: 1, 2, ...
  per piece, 0 on padding; positions: offset inside the piece; weights: each target's
  weight in the loss (the packer's: 1 on real targets, 0 on padding; a synthetic task's:
  1 on answers only). Losses are sums of weight x token loss over the sum of weights.
  """
  inputs: np.ndarray
  targets: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  weights: np.ndarray


def check_token_ids(ids, vocab_size: int, what: str) -> None:
  """ValueError if ``ids`` (a :class:`Batch`, whose inputs and targets are checked, or an
  array of ids, on the host) holds an id outside [0, ``vocab_size``): an embedding lookup
  would clamp it silently and train on wrong rows (and the loss of such a target is not a
  number)."""
  for x in ((ids.inputs, ids.targets) if isinstance(ids, Batch) else (ids,)):
    x = np.asarray(x)
    if not x.size:
      continue
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= int(vocab_size):
      bad = hi if hi >= int(vocab_size) else lo
      raise ValueError(f"{what} holds token id {bad}, outside the model's vocabulary of "
                       f"{int(vocab_size)} ids: the data's ids must be below "
                       f"model.overrides.vocab_size (give data.vocab_size as the number of "
                       f"ids the data holds)")


class _Plan(NamedTuple):
  row_ptr: np.ndarray      # [R + 1] int64: pieces of row r are row_ptr[r]:row_ptr[r+1]
  piece_start: np.ndarray  # [P] int64 offset of the piece's first input token in the corpus
  piece_len: np.ndarray    # [P] int64 number of targets (<= seq_len)


def _pieces(corpus: Corpus, seq_len: int, doc_order: np.ndarray):
  """Starts and lengths of every piece, documents in ``doc_order``, pieces in order."""
  lengths = corpus.doc_lengths[doc_order] - 1          # targets per document
  keep = lengths > 0
  doc_order, lengths = doc_order[keep], lengths[keep]
  counts = -(-lengths // seq_len)                      # pieces per document
  first = np.repeat(corpus.doc_starts[doc_order], counts)
  k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  starts = first + k * seq_len
  lens = np.minimum(seq_len, np.repeat(lengths, counts) - k * seq_len)
  return starts, lens


def _first_fit(lens: np.ndarray, seq_len: int) -> list[list[int]]:
  """Groups the indices of short pieces (< seq_len) into rows, first fit."""
  rows: list[list[int]] = []
  open_rows: list[tuple[int, list[int]]] = []   # (free slots, pieces)
  for i in np.flatnonzero(lens < seq_len).tolist():
    n = int(lens[i])
    for j, (free, members) in enumerate(open_rows):
      if n <= free:
        members.append(i)
        open_rows[j] = (free - n, members)
        break
    else:
      if len(open_rows) == _OPEN_ROWS:
        rows.append(open_rows.pop(0)[1])
      open_rows.append((seq_len - n, [i]))
  rows.extend(members for _, members in open_rows)
  return rows


class PackedDataset:
  """An endless, shuffled, exactly reproducible stream of packed rows of one corpus.

  Each epoch shuffles documents and rows with a generator seeded by (seed, epoch) and packs
  them anew, so epochs differ by a few rows; row r of the stream belongs to the epoch whose
  cumulative row range holds it (the ranges are counted as far as a caller reads).
  """

  def __init__(self, corpus: Corpus, seq_len: int, seed: int, shuffle: bool = True):
    self.corpus = corpus
    self.seq_len = int(seq_len)
    self.seed = int(seed)
    self.shuffle = shuffle
    self._epoch_ends = [self.rows_in_epoch(0)]   # cumulative rows at the end of each epoch

  def rows_in_epoch(self, epoch: int) -> int:
    return len(self._plan(epoch).row_ptr) - 1

  def _locate(self, index: int) -> tuple[int, int]:
    """(epoch, row within it) of stream row ``index``."""
    ends = self._epoch_ends
    while ends[-1] <= index:
      ends.append(ends[-1] + self.rows_in_epoch(len(ends)))
    epoch = bisect.bisect_right(ends, index)
    return epoch, index - (ends[epoch - 1] if epoch else 0)

  @functools.lru_cache(maxsize=2)
  def _plan(self, epoch: int) -> _Plan:
    rng = np.random.default_rng([self.seed, epoch])
    docs = np.arange(self.corpus.num_docs)
    if self.shuffle:
      docs = rng.permutation(docs)
    starts, lens = _pieces(self.corpus, self.seq_len, docs)
    # Full pieces fill a row each; only the short tail of each document is packed.
    full = np.flatnonzero(lens == self.seq_len)
    short = _first_fit(lens, self.seq_len)
    members = np.concatenate([full] + [np.asarray(r, np.int64) for r in short])
    sizes = np.concatenate([np.ones(len(full), np.int64), [len(r) for r in short]]).astype(np.int64)
    offsets = np.cumsum(sizes) - sizes
    order = np.arange(len(sizes))
    if self.shuffle:
      order = rng.permutation(len(sizes))
    sizes, offsets = sizes[order], offsets[order]
    row_ptr = np.zeros(len(sizes) + 1, np.int64)
    row_ptr[1:] = np.cumsum(sizes)
    within = np.arange(row_ptr[-1]) - np.repeat(row_ptr[:-1], sizes)
    pieces = members[np.repeat(offsets, sizes) + within]
    return _Plan(row_ptr, starts[pieces], lens[pieces])

  def row(self, index: int) -> Batch:
    """Row ``index`` of the stream, fields [T]."""
    epoch, r = self._locate(int(index))
    plan = self._plan(epoch)
    T = self.seq_len
    out = Batch(np.full(T, tokenizer.PAD_ID, np.int32), np.full(T, tokenizer.PAD_ID, np.int32),
                np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.float32))
    offset = 0
    tokens = self.corpus.tokens
    for seg, p in enumerate(range(plan.row_ptr[r], plan.row_ptr[r + 1]), start=1):
      s, n = int(plan.piece_start[p]), int(plan.piece_len[p])
      out.inputs[offset:offset + n] = tokens[s:s + n]
      out.targets[offset:offset + n] = tokens[s + 1:s + n + 1]
      out.segment_ids[offset:offset + n] = seg
      out.positions[offset:offset + n] = np.arange(n)
      out.weights[offset:offset + n] = 1.0
      offset += n
    return out

  def rows(self, start: int, count: int) -> Batch:
    """Rows start .. start + count - 1 of the stream, fields [count, T]."""
    got = [self.row(i) for i in range(start, start + count)]
    return Batch(*(np.stack(f) for f in zip(*got)))


def contiguous_windows(corpus: Corpus, length: int, max_docs: int) -> Batch:
  """The first ``length`` targets of up to ``max_docs`` documents at least that long.

  Used for loss against position: every row is one document from its BOS on, unpacked.
  Fields [N, length]; documents in corpus order (which is sorted by path).
  """
  lengths = corpus.doc_lengths - 1
  docs = np.flatnonzero(lengths >= length)[:max_docs]
  if len(docs) == 0:
    raise ValueError(f"no document has {length} targets; longest has {lengths.max()}")
  idx = corpus.doc_starts[docs][:, None] + np.arange(length + 1)[None, :]   # [N, L + 1]
  window = corpus.tokens[idx].astype(np.int32)
  n = len(docs)
  return Batch(window[:, :-1], window[:, 1:], np.ones((n, length), np.int32),
               np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy(),
               np.ones((n, length), np.float32))

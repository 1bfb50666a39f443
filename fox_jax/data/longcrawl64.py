"""LongCrawl64 in the layout the Forgetting Transformer authors train on, cut as they cut it.

The store: a directory with ``train.zarr`` and ``heldout.zarr``, each one 2-D integer zarr
array (format 2) of shape [documents, 65536]: one document of 65,536 GPT-2 token ids per row
(6,609,334 train and 52,131 held-out documents in the full corpus).

How the authors read it (github.com/zhixuan-lin/forgetting-transformer, commit 883f260,
``src/forgetting_transformer/datamodule/longcrawl64.py``):

* L53, L66: ``data_dir / "train.zarr"`` and ``data_dir / "heldout.zarr"``; L162
  ``zarr.open(data_path, mode="r")``; L164-165 assert [DOC_COUNT, DOC_LEN=65536].
* L167-172: ``seq_len`` is always ``batch_len`` (the training length T), T <= 65536.
* L181-182: T must divide 65536 ("You probably don't want this" otherwise); the usable
  length of a document is ``doc_len = 65536 - 65536 % T`` (tokens past it are dropped).
* L243-261: batch b is the window ``dataset[docs, c*T:(c+1)*T]`` of ``batch_size``
  consecutive documents, with column ``c = b // (doc_count / batch_size)`` and document block
  ``b % (doc_count / batch_size)``: non-overlapping T-token windows, and all documents'
  first windows come before any document's second window (the rows of one document are
  spread over the run, not kept together). No shuffling (L80-86 ``shuffle=False`` with a
  sequential ``StatefulSampler``, L284-298): the order is the store's.
* L265-273: ``labels`` are the window's T tokens; ``input_ids`` are the window rolled right
  by one with position 0 set to 50256 (GPT-2's ``<|endoftext|>``), and ``resets[0]`` True:
  every row is an independent sequence that starts from EOT, so the first token of every
  window is a target and the last is never an input; no token of one window is input to
  another.
* L186, L191: training uses the first ``doc_count - doc_count % batch_size`` documents,
  evaluation the first ``eval_tokens / doc_len`` held-out documents.

How this module reproduces it: document j of the source is the window
``[50256] + tokens[d, c*T:(c+1)*T]`` of T + 1 tokens, with ``c, d = divmod(j, num_docs)``
(column-major, the authors' order). The pipeline cuts a document of n tokens into pieces of
at most T targets (inputs ``tokens[s:s+T]``, targets ``tokens[s+1:s+T+1]``), so each T + 1
window is exactly one piece, with no tail to pack: inputs ``[50256] + window[:-1]``, targets
``window``, positions from 0 in its own segment (the authors' reset) -- exactly the authors'
row. The pipeline must not add a BOS or EOS of its own to these (tokenized) documents.
Read in order with batch size B and ``num_docs`` a multiple of B, the source's rows come in
the authors' batches; ``num_docs`` selects the authors' document counts (first documents).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from fox_jax.data.source import SPLITS, ReopensLazily, checked_index
from fox_jax.errors import UsageError

EOT_ID = 50256        # GPT-2 <|endoftext|>: the first input of every row
DOC_LEN = 65536       # tokens per LongCrawl64 document
STORES = {"train": "train.zarr", "heldout": "heldout.zarr"}


def _import_zarr():
  try:
    import zarr
  except ImportError:
    raise UsageError("reading LongCrawl64 needs zarr: pip install 'fox-jax[data]'") from None
  return zarr


def _open_array(store: str):
  """The zarr array at ``store``, read-only; ValueError if it is not a 2-D integer array."""
  zarr = _import_zarr()
  try:
    array = zarr.open(store, mode="r")
  except Exception as e:  # zarr raises its own exception types
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(f"{store} is not a zarr array ({detail})") from None
  if not isinstance(array, zarr.Array):
    raise ValueError(f"{store} is a zarr group, not the 2-D integer array [documents, tokens] "
                     f"of LongCrawl64")
  dtype = np.dtype(array.dtype)
  if array.ndim != 2 or not np.issubdtype(dtype, np.integer):
    raise ValueError(f"{store} holds a {dtype} array of shape {tuple(array.shape)}, not the "
                     f"2-D integer array [documents, tokens] of LongCrawl64")
  return array


class LongCrawl64Source(ReopensLazily):
  """The T + 1-token windows of a LongCrawl64 store (module docstring), read lazily.

  Attributes:
    store: the zarr array's path (``.../train.zarr``).
    split: 'train' or 'heldout'.
    seq_len: T, the targets per window.
    num_docs: the store's documents used (its first).
    windows_per_doc: ``doc_len // seq_len``.
    dtype: the documents' dtype (the store's, widened to hold 50256).
  """

  tokenized = True

  def __init__(self, store: str, split: str, seq_len: int, num_docs: int, doc_len: int,
               dtype: np.dtype, array=None):
    self.store = store
    self.split = split
    self.seq_len = seq_len
    self.num_docs = num_docs
    self.windows_per_doc = doc_len // seq_len
    self.dtype = np.promote_types(dtype, np.uint16)
    self._handle = array

  def _open(self):
    return _open_array(self.store)

  def __len__(self) -> int:
    return self.num_docs * self.windows_per_doc

  def __getitem__(self, index: int) -> np.ndarray:
    index = checked_index(index, len(self), "window")
    column, doc = divmod(index, self.num_docs)
    out = np.empty(self.seq_len + 1, self.dtype)
    out[0] = EOT_ID
    out[1:] = self.handle()[doc, column * self.seq_len:(column + 1) * self.seq_len]
    return out


def open_longcrawl64(path: str, split: str, seq_len: int, *,
                     num_docs: Optional[int] = None) -> LongCrawl64Source:
  """The ``split`` of a LongCrawl64 directory, as the authors' rows of ``seq_len`` targets.

  Args:
    path: the directory holding ``train.zarr`` and ``heldout.zarr``.
    split: 'train' or 'heldout' (``train.zarr`` or ``heldout.zarr``).
    seq_len: T, the training length; documents are cut into ``65536 // T`` windows (the
      authors require T to divide 65536; a remainder is dropped, as their ``doc_len``).
    num_docs: use the store's first ``num_docs`` documents (the authors' counts:
      ``6609334 - 6609334 % batch_size`` for training, ``eval_tokens // 65536`` held out);
      None: all.

  Returns:
    A tokenized source whose document j is ``[50256] + window`` (T + 1 ids), window
    ``j // num_docs`` of document ``j % num_docs`` (module docstring).

  Raises:
    FileNotFoundError: no such directory.
    ValueError: no ``train.zarr`` / ``heldout.zarr`` there, not a 2-D integer array, a bad
      ``seq_len`` or ``num_docs``.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such LongCrawl64 directory: {path}")
  if not os.path.isdir(path):
    raise ValueError(f"{path} is not a directory (LongCrawl64 is a directory holding "
                     f"train.zarr and heldout.zarr)")
  present = [s for s in STORES.values() if os.path.isdir(os.path.join(path, s))]
  if not present:
    raise ValueError(f"{path} holds neither train.zarr nor heldout.zarr: not a LongCrawl64 "
                     f"directory")
  store = os.path.abspath(os.path.join(path, STORES[split]))
  if STORES[split] not in present:
    raise ValueError(f"{path} has no {STORES[split]} (LongCrawl64's {split} split)")
  array = _open_array(store)
  total, doc_len = (int(x) for x in array.shape)
  if seq_len > doc_len:
    raise ValueError(f"seq_len {seq_len} is longer than the {doc_len}-token documents of "
                     f"{store}")
  if not total:
    raise ValueError(f"{store} has no documents")
  if num_docs is None:
    num_docs = total
  elif (isinstance(num_docs, bool) or not isinstance(num_docs, (int, np.integer))
        or not 1 <= num_docs <= total):
    raise ValueError(f"num_docs must be an integer in [1, {total}] ({store} has {total} "
                     f"documents), got {num_docs!r}")
  return LongCrawl64Source(store, split, int(seq_len), int(num_docs), doc_len,
                           np.dtype(array.dtype), array)

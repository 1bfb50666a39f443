"""The training data of a run, by ``config.data.source``: one registry of sources.

A *document source* opens to a :class:`~fox_jax.data.source.DataSource` per split (random
access to its documents; text or token ids), which a loader of ``config.data.loader``
(``fox_jax.data.loader.LOADERS``) tokenizes, cuts and packs into rows. A *row stream* (the
synthetic MQAR task) gives ready rows by position (``rows(start, count)``, ``seq_len``).
Each source also says how many token ids a model needs for it and whether its documents are
text (the haystacks of the retrieval evaluations need text).

Sources (one line each in :data:`DATASETS`):

* ``builtin``: this interpreter's standard library, one document per .py file.
* ``text``: the files under ``data.path`` (a directory or a glob), one document per file.
* ``tfds``: a local prepared TFDS dataset at ``data.path`` (``fox_jax.data.tfds_source``).
* ``longcrawl64``: the authors' zarr stores ``data.path/{train,heldout}.zarr``
  (``fox_jax.data.longcrawl64``), GPT-2 token ids.
* ``array_record``: pre-tokenized documents in ArrayRecord shards
  (``fox_jax.data.array_record``).
* ``mqar``: multi-query associative recall (``fox_jax.data.mqar``), a row stream.

Held-out documents come from the source's own held-out split (``data.heldout_path``, a TFDS
split, ``heldout.zarr``) or else from a ``data.heldout_fraction`` of the documents chosen by
a stable hash. Adding a source: an ``open`` function and one entry in :data:`DATASETS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence


from fox_jax.data import loader as loader_lib
from fox_jax.data import mqar, source as source_lib, tokenizer as tokenizer_lib
from fox_jax.data.packing import PackedDataset
from fox_jax.data.sources import Corpus, TextFiles, stdlib_files, text_files

SPLITS = source_lib.SPLITS
# Token ids of GPT-2's tokenizer, which LongCrawl64 was tokenized with.
GPT2_VOCAB = 50257


@dataclasses.dataclass(frozen=True)
class Source:
  """open(data_cfg, split) -> a DataSource (documents) or a row stream (``documents`` False);
  vocab(data_cfg) -> (ids a model needs, what for); text: documents are text."""
  open: Callable[[Any, str], Any]
  vocab: Callable[[Any], tuple[int, str]]
  text: bool
  documents: bool = True


def _no_path(data_cfg, source: str, *fields: str) -> None:
  for field in fields:
    if data_cfg.get(field):
      raise ValueError(f"data.{field} is given ({data_cfg.get(field)}) but data.source "
                       f"{source!r} does not read it" + (
                           "; set data.source='text' to train on the files at data.path"
                           if source == "builtin" else ""))


def _open_builtin(data_cfg, split: str) -> TextFiles:
  _no_path(data_cfg, "builtin", "path", "heldout_path")
  return TextFiles(stdlib_files(), split, data_cfg.heldout_fraction)


def _open_text(data_cfg, split: str) -> TextFiles:
  if not data_cfg.path:
    raise ValueError("data.source 'text' needs data.path (a directory or a glob)")
  if data_cfg.get("heldout_path"):
    return TextFiles(text_files(data_cfg.path if split == "train" else data_cfg.heldout_path),
                     split)
  return TextFiles(text_files(data_cfg.path), split, data_cfg.heldout_fraction)


def _open_tfds(data_cfg, split: str):
  from fox_jax.data import tfds_source
  _no_path(data_cfg, "tfds", "heldout_path")
  return tfds_source.open_tfds(
      data_cfg.path, split, feature=data_cfg.tfds_feature,
      train_split=data_cfg.tfds_train_split, heldout_split=data_cfg.tfds_heldout_split,
      heldout_fraction=data_cfg.heldout_fraction)


def _open_longcrawl64(data_cfg, split: str):
  from fox_jax.data import longcrawl64
  _no_path(data_cfg, "longcrawl64", "heldout_path")
  return longcrawl64.open_longcrawl64(data_cfg.path, split, int(data_cfg.seq_len))


def _open_array_record(data_cfg, split: str):
  from fox_jax.data import array_record
  return array_record.open_array_record(
      data_cfg.path, split, dtype=data_cfg.array_record_dtype,
      heldout_pattern=data_cfg.get("heldout_path") or "",
      heldout_fraction=data_cfg.heldout_fraction)


def tokenizer_spec(data_cfg) -> str:
  """``data.tokenizer``: 'bytes' (also for configs saved before the field) or a file."""
  return data_cfg.get("tokenizer") or "bytes"


def tokenizer_of(data_cfg) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer (``data.tokenizer``: 'bytes' or a tokenizer file)."""
  return tokenizer_lib.load_tokenizer(tokenizer_spec(data_cfg))


def _tokenizer_vocab(data_cfg) -> tuple[int, str]:
  tok = tokenizer_of(data_cfg)
  return tok.vocab_size, ("the byte tokenizer's ids" if tok.name == "bytes"
                          else f"the ids of data.tokenizer {tok.name}")


def _ids_vocab(default: Optional[int]) -> Callable[[Any], tuple[int, str]]:
  """Pre-tokenized documents: data.vocab_size, else the tokenizer's (when one is given),
  else ``default``."""
  def vocab(data_cfg) -> tuple[int, str]:
    if data_cfg.get("vocab_size"):
      return int(data_cfg.vocab_size), f"config.data.vocab_size={data_cfg.vocab_size}"
    if tokenizer_spec(data_cfg) != "bytes":
      return _tokenizer_vocab(data_cfg)
    if default is None:
      raise ValueError(f"data.source {data_cfg.source!r} holds token ids: give their number "
                       f"as data.vocab_size (or their tokenizer as data.tokenizer)")
    return default, f"the GPT-2 ids of data.source {data_cfg.source!r}"
  return vocab


def _tfds_vocab(data_cfg) -> tuple[int, str]:
  if _open_tfds(data_cfg, "train").tokenized:
    return _ids_vocab(None)(data_cfg)
  return _tokenizer_vocab(data_cfg)


def _mqar_vocab(data_cfg) -> tuple[int, str]:
  return int(data_cfg.mqar_vocab), f"config.data.mqar_vocab={data_cfg.mqar_vocab}"


DATASETS = {
    "builtin": Source(_open_builtin, _tokenizer_vocab, text=True),
    "text": Source(_open_text, _tokenizer_vocab, text=True),
    "tfds": Source(_open_tfds, _tfds_vocab, text=True),
    "longcrawl64": Source(_open_longcrawl64, _ids_vocab(GPT2_VOCAB), text=False),
    "array_record": Source(_open_array_record, _ids_vocab(None), text=False),
    "mqar": Source(mqar.dataset_from_config, _mqar_vocab, text=False, documents=False),
}


def source(data_cfg) -> Source:
  """The registered source of ``data_cfg.source``; ValueError naming the others."""
  try:
    return DATASETS[data_cfg.source]
  except KeyError:
    raise ValueError(f"data.source must be one of {tuple(DATASETS)}, got "
                     f"{data_cfg.source!r}") from None


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def open_documents(data_cfg, split: str) -> source_lib.DataSource:
  """The ``split`` documents of a document source; ValueError (or OSError) when its data
  cannot be had or the split is empty."""
  _check_split(split)
  entry = source(data_cfg)
  if not entry.documents:
    raise ValueError(f"data.source {data_cfg.source!r} is a synthetic task, not documents")
  docs = entry.open(data_cfg, split)
  if len(docs) == 0:
    where = f" of {data_cfg.path}" if data_cfg.get("path") else ""
    if split == "heldout":
      raise ValueError(
          f"the held-out split{where} has no documents (data.heldout_fraction="
          f"{data_cfg.heldout_fraction}); raise data.heldout_fraction or give held-out "
          f"documents" + (" as data.heldout_path" if data_cfg.source in ("text", "array_record")
                          else " (data.tfds_heldout_split)" if data_cfg.source == "tfds"
                          else ""))
    raise ValueError(f"the training split{where} has no documents"
                     + (f" (data.heldout_fraction={data_cfg.heldout_fraction} holds out "
                        f"all of them)" if not data_cfg.get("heldout_path") else ""))
  return docs


def pad_id(data_cfg) -> int:
  """The id that fills the unused end of a packed row (no loss there)."""
  if not source(data_cfg).text and tokenizer_spec(data_cfg) == "bytes":
    return 0
  tok = tokenizer_of(data_cfg)
  for special in (tok.pad_id, tok.eos_id):
    if special is not None:
      return int(special)
  return 0


def _packed_stream(data_cfg, split: str) -> PackedDataset:
  return PackedDataset(corpus_from_config(data_cfg, split), data_cfg.seq_len, data_cfg.seed)


def dataset_from_config(data_cfg, split: str):
  """A random-access row stream of ``split``: the source's own for a row stream, the
  in-memory ``packed`` stream of a document source (``rows(start, count)``)."""
  _check_split(split)
  entry = source(data_cfg)
  return entry.open(data_cfg, split) if not entry.documents else _packed_stream(data_cfg, split)


def _loader_name(data_cfg) -> str:
  name = data_cfg.get("loader") or "grain"
  name = "grain" if name == "auto" else name   # a new run's (run_config.resolve_loader)
  if name not in LOADERS or name == "rows":
    raise ValueError(f"data.loader must be 'grain' or 'packed', got {name!r}")
  return name if source(data_cfg).documents else "rows"


def _grain_loader(data_cfg, lanes: Sequence[int]):
  return loader_lib.GrainLoader(
      open_documents(data_cfg, "train"), tokenizer_spec(data_cfg),
      int(data_cfg.seq_len), int(data_cfg.global_batch), lanes, seed=int(data_cfg.seed),
      packing_bins=int(data_cfg.packing_bins), workers=int(data_cfg.workers),
      pad_id=pad_id(data_cfg), read_threads=int(data_cfg.get("read_threads", 0)))


def _rows_loader(data_cfg, lanes: Sequence[int]):
  return loader_lib.RowsLoader(dataset_from_config(data_cfg, "train"),
                               int(data_cfg.global_batch), lanes)


def _grain_heldout(data_cfg, count: int):
  return loader_lib.first_rows(open_documents(data_cfg, "heldout"),
                               tokenizer_spec(data_cfg), int(data_cfg.seq_len),
                               count, packing_bins=int(data_cfg.packing_bins),
                               pad_id=pad_id(data_cfg))


def _rows_heldout(data_cfg, count: int):
  return dataset_from_config(data_cfg, "heldout")


@dataclasses.dataclass(frozen=True)
class Loader:
  """train(data_cfg, lanes) -> a loader of the training rows ``lanes`` of every step;
  heldout(data_cfg, count) -> the held-out rows (``rows(start, n)``) of the validation loss."""
  train: Callable[[Any, Sequence[int]], Any]
  heldout: Callable[[Any, int], Any]


LOADERS = {
    "grain": Loader(_grain_loader, _grain_heldout),
    "packed": Loader(_rows_loader, _rows_heldout),
    "rows": Loader(_rows_loader, _rows_heldout),
}


def train_loader(data_cfg, lanes: Sequence[int]):
  """The loader of the training rows ``lanes`` (indices within a step's global batch)."""
  return LOADERS[_loader_name(data_cfg)].train(data_cfg, lanes)


def heldout_rows(data_cfg, count: int):
  """The held-out rows the validation loss reads (the first ``count`` at least)."""
  return LOADERS[_loader_name(data_cfg)].heldout(data_cfg, int(count))


def corpus_from_config(data_cfg, split: str, max_docs: Optional[int] = None) -> Corpus:
  """The documents of ``split`` tokenized into one in-memory :class:`Corpus` (the first
  ``max_docs`` when given; empty documents are left out)."""
  docs = open_documents(data_cfg, split)
  tokens = loader_lib._Tokens(docs.tokenized, tokenizer_spec(data_cfg))
  n = len(docs) if max_docs is None else min(len(docs), int(max_docs))
  chunks, names = [], []
  for i in range(n):
    ids = tokens(docs[i])
    if len(ids):
      chunks.append(ids)
      names.append(docs.name(i) if hasattr(docs, "name") else str(i))
  if not chunks:
    raise ValueError(f"split {split!r} has no documents")
  return Corpus.of(chunks, names)

"""The training data of a run, by ``config.data.source``: one registry of dataset builders.

A dataset is an endless, exactly reproducible stream of rows: ``seq_len``,
``rows(start, count) -> Batch`` [count, seq_len] and ``row(index) -> Batch`` [seq_len]
(``PackedDataset``, ``MQARDataset``); the training loop reads it by stream position, so the
position in a checkpoint is all a resume needs. Each source also says how many token ids a
model needs for it and whether it is text (documents of the byte tokenizer: the per-token
loss against position and the haystacks of the retrieval evaluations need one).

Adding a source: a builder and one entry in :data:`DATASETS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

from fox_jax.data import mqar, tokenizer
from fox_jax.data.packing import PackedDataset
from fox_jax.data.sources import corpus_from_config

Dataset = Union[PackedDataset, mqar.MQARDataset]
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class DataSource:
  """build(data_cfg, split) -> dataset; vocab(data_cfg) -> (ids a model needs, what for);
  text: documents of the byte tokenizer."""
  build: Callable[[Any, str], Dataset]
  vocab: Callable[[Any], tuple[int, str]]
  text: bool


def _packed(data_cfg, split: str) -> PackedDataset:
  return PackedDataset(corpus_from_config(data_cfg, split), data_cfg.seq_len, data_cfg.seed)


def _byte_vocab(data_cfg) -> tuple[int, str]:
  return tokenizer.NUM_TOKENS, "the byte tokenizer's ids"


def _mqar_vocab(data_cfg) -> tuple[int, str]:
  return int(data_cfg.mqar_vocab), f"config.data.mqar_vocab={data_cfg.mqar_vocab}"


DATASETS = {
    "builtin": DataSource(_packed, _byte_vocab, text=True),
    "text": DataSource(_packed, _byte_vocab, text=True),
    "mqar": DataSource(mqar.dataset_from_config, _mqar_vocab, text=False),
}


def source(data_cfg) -> DataSource:
  """The registered source of ``data_cfg.source``; ValueError naming the others."""
  try:
    return DATASETS[data_cfg.source]
  except KeyError:
    raise ValueError(f"data.source must be one of {tuple(DATASETS)}, got "
                     f"{data_cfg.source!r}") from None


def dataset_from_config(data_cfg, split: str) -> Dataset:
  """The ``split`` ('train' or 'heldout') stream of a data config; ValueError or OSError
  when its data cannot be had."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return source(data_cfg).build(data_cfg, split)

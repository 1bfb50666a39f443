"""Data: document sources (``source.DataSource``; built-in stdlib corpus, text files, TFDS,
LongCrawl64, ArrayRecord) and the synthetic MQAR task in one registry
(``datasets.DATASETS``, by ``config.data.source``), tokenizers (``load_tokenizer``: bytes, a
Hugging Face tokenizer.json, SentencePiece), packing and the loaders that feed training
(``loader``; grain)."""

from fox_jax.data.packing import Batch, PackedDataset, contiguous_windows
from fox_jax.data.sources import Corpus, load_corpus, stdlib_files, text_files
from fox_jax.data.tokenizer import (BOS_ID, EOS_ID, NUM_TOKENS, PAD_ID, Tokenizer, decode, encode,
                                    load_tokenizer, padded_vocab_size)
from fox_jax.data.mqar import MQARDataset
from fox_jax.data.datasets import DATASETS, corpus_from_config, dataset_from_config

__all__ = [
    "Batch", "PackedDataset", "contiguous_windows", "Corpus", "corpus_from_config",
    "load_corpus", "stdlib_files", "text_files", "BOS_ID", "EOS_ID", "NUM_TOKENS", "PAD_ID",
    "Tokenizer", "decode", "encode", "load_tokenizer", "padded_vocab_size", "MQARDataset",
    "DATASETS", "dataset_from_config",
]

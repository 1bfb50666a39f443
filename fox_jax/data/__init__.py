"""Data: sources (built-in stdlib corpus, plain text, MQAR), tokenizers (``load_tokenizer``:
bytes, a Hugging Face tokenizer.json, SentencePiece), packing, the dataset registry
(``datasets.DATASETS``, by ``config.data.source``)."""

from fox_jax.data.packing import Batch, PackedDataset, contiguous_windows
from fox_jax.data.sources import Corpus, corpus_from_config, load_corpus, stdlib_files, text_files
from fox_jax.data.tokenizer import (BOS_ID, EOS_ID, NUM_TOKENS, PAD_ID, Tokenizer, decode, encode,
                                   load_tokenizer, padded_vocab_size)
from fox_jax.data.mqar import MQARDataset
from fox_jax.data.datasets import DATASETS, dataset_from_config

__all__ = [
    "Batch", "PackedDataset", "contiguous_windows", "Corpus", "corpus_from_config",
    "load_corpus", "stdlib_files", "text_files", "BOS_ID", "EOS_ID", "NUM_TOKENS", "PAD_ID",
    "decode", "encode", "Tokenizer", "load_tokenizer", "padded_vocab_size", "MQARDataset",
    "DATASETS", "dataset_from_config",
]

"""Data: sources (built-in stdlib corpus, plain text, MQAR), byte tokenizer, packing,
the dataset registry (``datasets.DATASETS``, by ``config.data.source``)."""

from fox_jax.data.packing import Batch, PackedDataset, contiguous_windows
from fox_jax.data.sources import Corpus, corpus_from_config, load_corpus, stdlib_files, text_files
from fox_jax.data.tokenizer import BOS_ID, EOS_ID, NUM_TOKENS, PAD_ID, decode, encode
from fox_jax.data.mqar import MQARDataset
from fox_jax.data.datasets import DATASETS, dataset_from_config

__all__ = [
    "Batch", "PackedDataset", "contiguous_windows", "Corpus", "corpus_from_config",
    "load_corpus", "stdlib_files", "text_files", "BOS_ID", "EOS_ID", "NUM_TOKENS", "PAD_ID",
    "decode", "encode", "MQARDataset", "DATASETS", "dataset_from_config",
]

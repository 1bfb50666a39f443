"""Data: sources (built-in stdlib corpus, plain text), byte tokenizer, packing, loading."""

from fox_jax.data.packing import Batch, PackedDataset, contiguous_windows
from fox_jax.data.sources import Corpus, corpus_from_config, load_corpus, stdlib_files, text_files
from fox_jax.data.tokenizer import BOS_ID, EOS_ID, NUM_TOKENS, PAD_ID, decode, encode

__all__ = [
    "Batch", "PackedDataset", "contiguous_windows", "Corpus", "corpus_from_config",
    "load_corpus", "stdlib_files", "text_files", "BOS_ID", "EOS_ID", "NUM_TOKENS", "PAD_ID",
    "decode", "encode",
]

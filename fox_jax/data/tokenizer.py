"""Byte-level tokenizer: UTF-8 bytes 0..255 plus three special tokens.

A byte vocabulary needs no trained merges and no download, so the built-in corpus and any
user text are tokenised the same way on every machine.
"""

from __future__ import annotations

import numpy as np

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
NUM_TOKENS = 259


def encode(text: str | bytes, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
  """Token ids [N] uint16 of ``text``: optional BOS, its UTF-8 bytes, optional EOS."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  body = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
  parts = ([np.array([BOS_ID], np.uint16)] if add_bos else []) + [body]
  parts += [np.array([EOS_ID], np.uint16)] if add_eos else []
  return np.concatenate(parts)


def decode(ids) -> str:
  """Text of ``ids`` with special tokens dropped; invalid UTF-8 is replaced, not raised."""
  ids = np.asarray(ids)
  return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

"""Tokenizers: one interface for the byte tokenizer, a Hugging Face ``tokenizer.json`` and a
SentencePiece ``.model`` file, used by training data, evaluation and generation alike.

``load_tokenizer(spec)`` gives a :class:`Tokenizer` for

* ``"bytes"``: :class:`BytesTokenizer`, UTF-8 bytes 0..255 plus PAD 256, BOS 257, EOS 258.
  A byte vocabulary needs no trained merges and no download, so the built-in corpus and any
  user text are tokenised the same way on every machine;
* a path ending in ``.json``, or a directory holding a ``tokenizer.json``:
  :class:`HFTokenizer` (the ``tokenizers`` package, offline);
* a path ending in ``.model``: :class:`SentencePieceTokenizer` (the ``sentencepiece``
  package).

The kinds are the :data:`TOKENIZERS` registry (adding one: a loader and one entry). Every
problem with a spec or its file is a one-line ``UsageError`` naming it.

The module-level ``PAD_ID``, ``BOS_ID``, ``EOS_ID``, ``NUM_TOKENS``, ``encode`` and
``decode`` are the byte tokenizer's, as before the interface existed (runs resume bitwise
on ``encode``); the module itself can stand for the byte tokenizer where the evaluations
take a tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Optional, Union

import numpy as np

from fox_jax.errors import UsageError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

Text = Union[str, bytes]


class Tokenizer:
  """What every tokenizer offers (the byte tokenizer, a tokenizer.json, a SentencePiece model).

  Attributes:
    name: "bytes", or the path of the tokenizer's file.
    vocab_size: the number of ids the tokenizer can produce, special tokens included (a
      model's vocabulary must hold them; see :func:`padded_vocab_size`).
    bos_id, eos_id, pad_id: the ids of its begin-of-document, end-of-document and padding
      tokens, None where it has none (``BOS_ID``, ``EOS_ID``, ``PAD_ID`` are aliases).
    special_ids: the sorted ids of its special tokens (those and any others it marks as
      special), which ``decode`` drops and raw-id evaluations keep clear of.

  Subclasses set the attributes and implement ``_text_ids`` and ``_decode_ids``.
  """

  name: str
  vocab_size: int
  bos_id: Optional[int] = None
  eos_id: Optional[int] = None
  pad_id: Optional[int] = None
  special_ids: tuple[int, ...] = ()
  # What ``encode`` adds for a flag left None (with both None, ``_default_ids`` decides).
  default_add_bos: bool = False
  default_add_eos: bool = False

  @property
  def BOS_ID(self) -> Optional[int]:
    return self.bos_id

  @property
  def EOS_ID(self) -> Optional[int]:
    return self.eos_id

  @property
  def PAD_ID(self) -> Optional[int]:
    return self.pad_id

  def encode(self, text: Text, add_bos: Optional[bool] = None,
             add_eos: Optional[bool] = None) -> np.ndarray:
    """The ids [N] int32 of ``text`` (a prompt, or text an evaluation builds on).

    Args:
      text: str, or bytes of UTF-8 text (invalid bytes are replaced for subword tokenizers).
      add_bos, add_eos: both None: the tokenizer's own default (the file's post-processor
        for a tokenizer.json; BOS and no EOS for the byte tokenizer and a SentencePiece
        model, as a training document starts). Otherwise the text's ids plus the BOS / EOS
        asked for (a flag left None: ``default_add_bos`` / ``default_add_eos`` where the
        tokenizer has that token).

    Raises:
      UsageError: a BOS or EOS asked for that the tokenizer does not have.
    """
    if add_bos is None and add_eos is None:
      return np.asarray(self._default_ids(text), np.int32)
    if add_bos is None:
      add_bos = self.default_add_bos and self.bos_id is not None
    if add_eos is None:
      add_eos = self.default_add_eos and self.eos_id is not None
    for flag, token_id, what in ((add_bos, self.bos_id, "bos"), (add_eos, self.eos_id, "eos")):
      if flag and token_id is None:
        raise UsageError(self._no_token(what))
    return np.asarray(self._with_specials(self._text_ids(text), add_bos, add_eos), np.int32)

  def decode(self, ids) -> str:
    """The text of ``ids`` up to the first EOS, with special tokens and ids outside the
    vocabulary dropped."""
    ids = _until(ids, self.eos_id)
    keep = (ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self.special_ids)
    return self._decode_ids([int(i) for i in ids[keep]])

  def encode_document(self, text: Text) -> np.ndarray:
    """A training document's ids [N]: BOS (if the tokenizer has one), the text's ids, EOS
    (if it has one)."""
    ids = self._with_specials(self._text_ids(text), self.bos_id is not None,
                              self.eos_id is not None)
    return np.asarray(ids, np.int32)

  def _with_specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
    return ([self.bos_id] if add_bos else []) + list(ids) + ([self.eos_id] if add_eos else [])

  def _default_ids(self, text: Text) -> list[int]:
    add_bos = self.default_add_bos and self.bos_id is not None
    add_eos = self.default_add_eos and self.eos_id is not None
    return self._with_specials(self._text_ids(text), add_bos, add_eos)

  def _no_token(self, what: str) -> str:
    return f"{self.name}: the tokenizer has no {what} token"

  def _text_ids(self, text: Text) -> list[int]:
    """The ids of ``text`` alone, no special tokens added."""
    raise NotImplementedError

  def _decode_ids(self, ids: list[int]) -> str:
    """The text of ``ids``, all of them ordinary ids inside the vocabulary."""
    raise NotImplementedError

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r})"


class BytesTokenizer(Tokenizer):
  """UTF-8 bytes 0..255 plus PAD 256, BOS 257, EOS 258 (259 ids).

  ``encode(text)`` is BOS + the text's bytes (a prompt starts as a training document does);
  ``encode_document`` is exactly the module's ``encode(text)`` (uint16), which training
  corpora hold.
  """

  name = "bytes"
  vocab_size = 259
  pad_id = 256
  bos_id = 257
  eos_id = 258
  special_ids = (256, 257, 258)
  default_add_bos = True

  def encode(self, text: Text, add_bos: Optional[bool] = None,
             add_eos: Optional[bool] = None) -> np.ndarray:
    add_bos = self.default_add_bos if add_bos is None else add_bos
    add_eos = self.default_add_eos if add_eos is None else add_eos
    return encode(text, add_bos=bool(add_bos), add_eos=bool(add_eos)).astype(np.int32)

  def encode_document(self, text: Text) -> np.ndarray:
    """BOS + the text's UTF-8 bytes + EOS, uint16: the module's ``encode(text)``."""
    return encode(text)

  def _text_ids(self, text: Text) -> list[int]:
    return encode(text, add_bos=False, add_eos=False).tolist()

  def _decode_ids(self, ids: list[int]) -> str:
    return decode(ids)


# The byte tokenizer as module functions and constants, as fox-jax had them first.
PAD_ID = BytesTokenizer.pad_id
BOS_ID = BytesTokenizer.bos_id
EOS_ID = BytesTokenizer.eos_id
NUM_TOKENS = BytesTokenizer.vocab_size


def encode(text: Text, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
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


class HFTokenizer(Tokenizer):
  """A Hugging Face ``tokenizer.json``, read offline with the ``tokenizers`` package.

  ``encode(text)`` applies the file's own post-processor (the special tokens it adds); with
  ``add_bos=`` / ``add_eos=`` (the evaluations' convention) it gives the text's ids alone
  plus the BOS / EOS asked for (a flag left None: not added).

  BOS, EOS and padding are the ``bos_token`` / ``eos_token`` / ``pad_token`` of a
  ``tokenizer_config.json`` beside the file. Without that file, they are the file's special
  tokens with the conventional names (:data:`CONVENTIONAL_TOKENS`: ``<s>`` /
  ``<|begin_of_text|>``, ``</s>`` / ``<|endoftext|>`` / ``<|end_of_text|>``, ``<pad>`` /
  ``<|padding|>``; the first present wins); None where neither names one.

  Args:
    path: the tokenizer.json.

  Raises:
    UsageError: no such file; the package is not installed; the file is not a tokenizer it
      can read.
  """

  # Special-token names that stand for BOS / EOS / padding when no tokenizer_config.json
  # says, in order of preference.
  CONVENTIONAL_TOKENS = {
      "bos_token": ("<s>", "<|begin_of_text|>"),
      "eos_token": ("</s>", "<|endoftext|>", "<|end_of_text|>"),
      "pad_token": ("<pad>", "<|padding|>"),
  }

  def __init__(self, path: str):
    _check_file(path)
    tokenizers = _import("tokenizers", path)
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the package raises its own exception types
      raise UsageError(f"{path} is not a tokenizer the 'tokenizers' package can read "
                       f"({_first_line(e)})") from None
    self.name = path
    self._set(tok, _hf_token_names(tok, os.path.join(os.path.dirname(path),
                                                     TOKENIZER_CONFIG_FILE)))

  def _set(self, tok, names: dict) -> None:
    self._tok = tok
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    ids = {key: None if token is None else tok.token_to_id(token)
           for key, token in names.items()}
    self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
    added = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    self.special_ids = tuple(sorted(added | {i for i in ids.values() if i is not None}))

  def _default_ids(self, text: Text) -> list[int]:
    return self._tok.encode(_as_str(text)).ids

  def _text_ids(self, text: Text) -> list[int]:
    return self._tok.encode(_as_str(text), add_special_tokens=False).ids

  def _decode_ids(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)

  def _no_token(self, what: str) -> str:
    return (f"{self.name}: no {what}_token is known (give it in the "
            f"{TOKENIZER_CONFIG_FILE} beside it)")

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_tok"] = self._tok.to_str()  # the tokenizer itself: no file needed to unpickle
    return state

  def __setstate__(self, state: dict) -> None:
    import tokenizers
    state = dict(state)
    state["_tok"] = tokenizers.Tokenizer.from_str(state["_tok"])
    self.__dict__.update(state)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece ``.model`` file, read with the ``sentencepiece`` package.

  BOS, EOS and padding are the model's own (``bos_id()`` / ``eos_id()`` / ``pad_id()``,
  as trained; -1 is none). ``encode(text)`` is BOS (if any) + the text's pieces, as a
  training document starts (LLaMA's convention); special ids are the model's control and
  unknown pieces.

  Args:
    path: the .model file.

  Raises:
    UsageError: no such file; the package is not installed; the file is not a model it can
      read.
  """

  default_add_bos = True

  def __init__(self, path: str):
    _check_file(path)
    spm = _import("sentencepiece", path)
    try:
      sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # RuntimeError / OSError, depending on the version
      raise UsageError(f"{path} is not a model the 'sentencepiece' package can read "
                       f"({_first_line(e)})") from None
    self.name = path
    self._set(sp)

  def _set(self, sp) -> None:
    self._sp = sp
    self.vocab_size = int(sp.get_piece_size())
    own = lambda i: None if i < 0 else int(i)
    self.bos_id, self.eos_id, self.pad_id = own(sp.bos_id()), own(sp.eos_id()), own(sp.pad_id())
    self.special_ids = tuple(i for i in range(self.vocab_size)
                             if sp.IsControl(i) or sp.IsUnknown(i))

  def _text_ids(self, text: Text) -> list[int]:
    return list(self._sp.encode(_as_str(text), out_type=int))

  def _decode_ids(self, ids: list[int]) -> str:
    return self._sp.decode(ids)

  def _no_token(self, what: str) -> str:
    return f"{self.name}: the model has no {what} token (train it with {what}_id set)"

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_sp"] = self._sp.serialized_model_proto()
    return state

  def __setstate__(self, state: dict) -> None:
    import sentencepiece as spm
    state = dict(state)
    state["_sp"] = spm.SentencePieceProcessor(model_proto=state["_sp"])
    self.__dict__.update(state)


@dataclasses.dataclass(frozen=True)
class TokenizerKind:
  """One kind of tokenizer a spec can name.

  Attributes:
    load: the tokenizer of a file path (of the spec itself for a kind without files).
    form: how a spec names it, for messages.
    suffix: a spec ending in this names a file of this kind.
    dir_file: a directory spec holding this file names that file.
  """
  load: Callable[[str], Tokenizer]
  form: str
  suffix: Optional[str] = None
  dir_file: Optional[str] = None


TOKENIZERS: dict[str, TokenizerKind] = {
    "bytes": TokenizerKind(lambda _: BytesTokenizer(), "'bytes'"),
    "hf": TokenizerKind(HFTokenizer, f"a Hugging Face .json file (or a directory holding "
                        f"{TOKENIZER_FILE})", suffix=".json", dir_file=TOKENIZER_FILE),
    "sentencepiece": TokenizerKind(SentencePieceTokenizer, "a SentencePiece .model file",
                                   suffix=".model"),
}


def resolve(spec: str) -> tuple[str, str]:
  """(kind in :data:`TOKENIZERS`, the path to load) that ``spec`` names.

  Raises:
    UsageError: ``spec`` is none of the accepted forms, or names a file that does not exist.
  """
  if not isinstance(spec, str) or not spec:
    raise UsageError(f"tokenizer: expected {_forms()}, got {spec!r}")
  for kind, k in TOKENIZERS.items():
    if k.suffix is None and k.dir_file is None and spec == kind:
      return kind, spec
  for kind, k in TOKENIZERS.items():
    if k.suffix is not None and spec.endswith(k.suffix) and not os.path.isdir(spec):
      _check_file(spec)
      return kind, spec
  if os.path.isdir(spec):
    for kind, k in TOKENIZERS.items():
      if k.dir_file is not None and os.path.isfile(os.path.join(spec, k.dir_file)):
        return kind, os.path.join(spec, k.dir_file)
  raise UsageError(f"tokenizer {spec!r}: expected {_forms()}")


def load_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer ``spec`` names: "bytes", a tokenizer.json (or a directory holding one),
  a SentencePiece .model file. Loaded once per spec and working directory (data workers
  call this per document); a file changed afterwards is not read again.

  Raises:
    UsageError: one line naming the spec or its file (see :func:`resolve` and the classes).
  """
  kind, path = resolve(spec)
  return _load(kind, path, os.path.abspath(path))


@functools.lru_cache(maxsize=32)
def _load(kind: str, path: str, where: str) -> Tokenizer:
  del where  # part of the cache key only: a relative path read from another directory
  return TOKENIZERS[kind].load(path)


def padded_vocab_size(n: int, multiple: int = 128) -> int:
  """``n`` rounded up to a multiple of ``multiple``, so that a model's vocab axis shards
  evenly (the byte tokenizer's 259 ids give 384).

  Raises:
    ValueError: ``n`` or ``multiple`` is not a positive int.
  """
  for arg, value in (("n", n), ("multiple", multiple)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"padded_vocab_size: {arg} must be a positive int, got {value!r}")
  return -(-int(n) // int(multiple)) * int(multiple)


def _forms() -> str:
  forms = [k.form for k in TOKENIZERS.values()]
  return ", ".join(forms[:-1]) + " or " + forms[-1]


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise UsageError(f"no such file: {path}")
  if not os.path.isfile(path):
    raise UsageError(f"{path} is not a file")


def _import(package: str, path: str):
  try:
    return __import__(package)
  except ImportError:
    raise UsageError(f"{path} needs the '{package}' package, which is not installed "
                     f"(pip install {package})") from None


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _as_str(text: Text) -> str:
  return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")


def _until(ids, eos_id: Optional[int]) -> np.ndarray:
  """``ids`` [N] up to (not including) the first ``eos_id``."""
  ids = np.asarray(ids).reshape(-1)
  if eos_id is not None:
    hits = np.flatnonzero(ids == eos_id)
    if hits.size:
      ids = ids[:hits[0]]
  return ids


def _special_token(path: str, key: str) -> Optional[str]:
  """The ``key`` token ("eos_token", "bos_token", ...) named in a tokenizer_config.json."""
  try:
    with open(path) as f:
      token = json.load(f).get(key)
  except (OSError, ValueError, AttributeError):
    return None
  if isinstance(token, dict):
    token = token.get("content")
  return token if isinstance(token, str) else None


def _hf_token_names(tok, config: str) -> dict[str, Optional[str]]:
  """The BOS / EOS / padding token names of ``tok``: its tokenizer_config.json's, or the
  conventional names among its special tokens when there is no such file."""
  keys = HFTokenizer.CONVENTIONAL_TOKENS
  if os.path.exists(config):
    return {key: _special_token(config, key) for key in keys}
  special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
  return {key: next((n for n in names if n in special), None) for key, names in keys.items()}


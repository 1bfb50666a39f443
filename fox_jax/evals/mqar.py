"""Multi-query associative recall (MQAR) accuracy, standard or last value wins.

A grid of context lengths x numbers of key-value pairs. Each cell holds ``num_examples``
test examples of ``fox_jax.data.mqar`` (seeded by (seed, length, pairs), apart from any
training stream), fed to the model teacher-forced, one forward pass per batch of rows; the
prediction at a query is the argmax of its next-token logits over the model's whole
vocabulary, and a cell's accuracy is the fraction of its queries answered with their key's
value (its most recent one for ``variant="last_value"``), zoology's accuracy over every
answer position. Chance is about 1 / (V - V // 2) (a guess among the values). A cell whose
length cannot hold its pairs and their queries is left out (null in the result).

Token ids: the task's tokens 0 .. V - 1 are fed as ids offset .. offset + V - 1. The
default offset is the smallest that keeps them clear of the tokenizer's special ids (BOS,
EOS, padding, ...): 0 for the byte tokenizer when V <= 256, 3 for a tokenizer whose ids 0-2
are special. A run trained on MQAR is evaluated as it trained (:func:`run_defaults`: its
ids, vocabulary, variant, power law, and half, once and twice its pairs) unless told
otherwise. A model whose vocabulary cannot hold the ids is a UsageError.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np

from fox_jax.data import mqar
from fox_jax.errors import UsageError
from fox_jax.evals import common

# ids [B, T] int -> the argmax of the next-token logits at every position [B, T].
PredictFn = Callable[[np.ndarray], np.ndarray]

SCORING = ("accuracy at the answer positions: the argmax of the teacher-forced next-token "
           "logits (over the whole vocabulary) at a query equals its key's value")
_NAMES = {f: f"mqar {f}" for f in ("vocab", "seq_len", "num_kv_pairs", "variant",
                                   "num_updates", "power_a")}
_NAMES["seq_len"] = "mqar length"


@dataclasses.dataclass
class Options:
  train_length: int
  lengths: Optional[Sequence] = None  # tokens, or 'Mx'; default 1x, 2x
  num_kv_pairs: Sequence[int] = (4, 8, 16)
  variant: str = "standard"  # or "last_value"
  num_updates: Optional[int] = None  # last_value: keys reassigned (default half the pairs)
  vocab: int = 256  # V: keys 0 .. V/2 - 1, values V/2 .. V - 1 (before the offset)
  power_a: float = 0.01
  num_examples: int = 128  # per cell
  token_offset: Optional[int] = None  # default: clear of the tokenizer's special ids
  seed: int = 0
  batch_size: int = 32

  def __post_init__(self):
    self.lengths = common.parse_lengths(self.lengths, self.train_length, (1, 2))
    kv = tuple(self.num_kv_pairs) if isinstance(self.num_kv_pairs, (list, tuple)) else ()
    if not kv or any(not _is_int(k) or k < 1 for k in kv):
      raise UsageError(f"mqar num_kv_pairs must be ints >= 1, got {self.num_kv_pairs!r}")
    if len(set(kv)) != len(kv):
      raise UsageError(f"mqar num_kv_pairs repeat: {list(kv)}")
    self.num_kv_pairs = tuple(int(k) for k in kv)
    if self.variant not in mqar.VARIANTS:
      raise UsageError(f"mqar variant must be one of {mqar.VARIANTS}, got {self.variant!r}")
    if self.variant == "standard":
      self.num_updates = None  # only the last_value variant reassigns keys
    for name in ("num_examples", "batch_size", "vocab"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < (4 if name == "vocab" else 1):
        raise UsageError(f"mqar {name} must be an int >= {4 if name == 'vocab' else 1}, got "
                         f"{getattr(self, name)!r}")
    if self.token_offset is not None and (not _is_int(self.token_offset)
                                          or self.token_offset < 0):
      raise UsageError(f"mqar token_offset must be an int >= 0, got {self.token_offset!r}")
    if not _is_int(self.seed) or self.seed < 0:
      raise UsageError(f"mqar seed must be an int >= 0, got {self.seed!r}")
    if not cells(self):
      raise UsageError(f"mqar: no length in {list(self.lengths)} holds any of "
                       f"{list(self.num_kv_pairs)} key-value pairs with their queries")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def cells(options: Options) -> dict[tuple[int, int], mqar.Spec]:
  """{(length, pairs): Spec} of the grid's cells that fit; UsageError for a bad field.

  A cell with fewer pairs than ``num_updates`` keys to reassign (e.g. half of a run's pairs)
  is left out, unless no cell would be left: then that is the error."""
  out, too_few = {}, None
  for length in options.lengths:
    for kv in options.num_kv_pairs:
      spec = mqar.Spec(options.vocab, int(length), kv, options.variant, options.num_updates,
                       options.power_a)
      if length < spec.context_len + 2 * kv - 1:
        continue
      if options.num_updates is not None and options.num_updates > kv:
        too_few = too_few or spec
        continue
      out[(int(length), kv)] = _checked(spec)
  if not out and too_few is not None:
    _checked(too_few)  # raises, naming num_updates
  return out


def _checked(spec: mqar.Spec) -> mqar.Spec:
  try:
    return spec.check(_NAMES)
  except ValueError as e:
    raise UsageError(str(e)) from None


def run_defaults(c) -> dict:
  """Options a run trained on MQAR (``config.data.source == 'mqar'``) is evaluated with
  unless given: its ids (offset 0), vocabulary, variant, updates and power law, and half,
  once and twice its pairs; {} for another run."""
  d = c.data
  if d.source != "mqar":
    return {}
  kv = int(d.mqar_num_kv_pairs)
  out = {"token_offset": 0, "vocab": int(d.mqar_vocab), "variant": d.mqar_variant,
         "power_a": float(d.mqar_power_a),
         "num_kv_pairs": tuple(sorted({max(1, kv // 2), kv, 2 * kv}))}
  if d.mqar_num_updates is not None:
    out["num_updates"] = int(d.mqar_num_updates)
  return out


def special_ids(tokenizer) -> set[int]:
  """The special token ids a tokenizer names (``special_ids``, BOS / EOS / PAD ids)."""
  ids = {int(i) for i in (getattr(tokenizer, "special_ids", None) or ())}
  for name in ("BOS_ID", "EOS_ID", "PAD_ID", "bos_id", "eos_id", "pad_id"):
    value = getattr(tokenizer, name, None)
    if _is_int(value):
      ids.add(int(value))
  return ids


def clear_offset(vocab: int, specials) -> int:
  """The smallest offset such that ids offset .. offset + vocab - 1 hold no special id."""
  offset = 0
  for s in sorted(specials):
    if offset <= s < offset + vocab:
      offset = s + 1
  return offset


def model_predict_fn(model) -> PredictFn:
  """The argmax of ``model``'s next-token logits (a DecoderLM), jitted, on one device."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, ids):
    m = nnx.merge(graphdef, state)
    logits, _ = nnx.capture(m.__call__, nnx.Intermediate)(ids)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return lambda ids: np.asarray(fn(state, jnp.asarray(ids, jnp.int32)))


def predict_rows(predict_fn: PredictFn, ids: np.ndarray, batch_size: int) -> np.ndarray:
  """Predictions [N, T] of ids [N, T], ``batch_size`` rows a call; the last batch is padded
  with copies of its last row, so that every call has one shape."""
  n = ids.shape[0]
  b = max(1, min(int(batch_size), n))
  out = []
  for start in range(0, n, b):
    chunk = ids[start:start + b]
    real = chunk.shape[0]
    if real < b:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - real, axis=0)])
    out.append(np.asarray(predict_fn(chunk))[:real])
  return np.concatenate(out)


def run(model, tokenizer, options: Options, *,
        predict_fn: Optional[PredictFn] = None) -> dict:
  """Accuracy per (pairs, length) cell. ``predict_fn`` (default: the argmax of ``model``'s
  logits, one forward pass per batch) maps ids [B, T] to predicted next ids [B, T]; the
  model (None with a ``predict_fn``) is checked to hold the ids."""
  V = options.vocab
  offset = (options.token_offset if options.token_offset is not None
            else clear_offset(V, special_ids(tokenizer)))
  grid_cells = cells(options)
  if model is not None:
    size = int(model.cfg.vocab_size)
    if offset + V > size:
      raise UsageError(f"mqar vocab {V} needs ids {offset}..{offset + V - 1}, past the model's "
                       f"vocabulary of {size} (give a smaller --vocab)")
    chunk = model.cfg.seq_chunk
    bad = [length for length, _ in grid_cells if chunk and length % chunk]
    if bad:
      raise UsageError(f"mqar lengths {sorted(set(bad))} must be multiples of the model's "
                       f"seq_chunk ({chunk})")
  predict_fn = predict_fn or model_predict_fn(model)
  L, K = list(options.lengths), list(options.num_kv_pairs)
  grid: list[list[Optional[float]]] = [[None] * len(L) for _ in K]
  answers = 0
  for (length, kv), spec in grid_cells.items():
    ex = mqar.generate(spec, options.num_examples, [options.seed, length, kv])
    pred = predict_rows(predict_fn, ex.inputs + offset, options.batch_size)
    at = ex.labels != mqar.IGNORE
    grid[K.index(kv)][L.index(length)] = float(np.mean(pred[at] == ex.labels[at] + offset))
    answers += int(at.sum())
  scores = [x for row in grid for x in row if x is not None]
  return {
      "task": "mqar", "options": common.options_dict(options), "scoring": SCORING,
      "token_offset": int(offset), "chance": 1.0 / (V - V // 2), "answers": answers,
      "lengths": L, "num_kv_pairs": K,
      "grid": grid,  # [pairs][length] accuracy; null where the length cannot hold the pairs
      "accuracy": float(np.mean(scores)),
  }


def plot(result: dict, path: str) -> None:
  o = result["options"]
  label = result.get("label", "")
  title = (f"MQAR ({o['variant']}) {label}\nvocab {o['vocab']}, {o['num_examples']} examples "
           f"per cell\nchance {result['chance']:.3f}, train length {o['train_length']}")
  grid = [[math.nan if x is None else x for x in row] for row in result["grid"]]
  common.heatmap({"accuracy": grid}, result["lengths"], result["num_kv_pairs"], title, path,
                 label="accuracy", ylabel="key-value pairs")

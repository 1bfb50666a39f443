"""Multi-query associative recall (MQAR) and its last-value-wins variant, as training data.

MQAR (Arora, Eyuboglu et al., "Zoology", 2023; ``zoology/data/multiquery_ar.py``) over a
vocabulary of V tokens: keys are drawn from the first half (ids 0 .. V//2 - 1), values
from the second (V//2 .. V - 1). An example of T tokens opens with its key-value pairs
``k1 v1 k2 v2 ... kn vn`` (n distinct keys, n distinct values); the rest is random tokens of
the whole vocabulary, among which every key is queried once, at an even offset
``2 g`` into that region. The slots g are drawn without replacement with probability
proportional to (g + 1) ** (power_a - 1) (a power law; power_a = 0.01 puts most queries
soon after the pairs, 1.0 anywhere), the first draw for k1, the second for k2, ... (the
successive draws of ``np.random.choice(..., replace=False, p=...)``, done here as an
exponential race). The target at a query is its key's value; every other position has
label -100 and no weight in the loss or the accuracy.

``variant="last_value"`` (last value wins; zoology's ``forgetting_mqar.py``): after the n
pairs, ``num_updates`` of the keys (distinct, in random order) appear again with a new
value (any value but the key's previous one), ``... kn vn ku1 vu1' ku2 vu2' ...``; a query's
answer is its key's most recent value. The queries follow the updates.

Random filler is drawn from the whole vocabulary, as in zoology, so a filler token may
equal a key (unlabelled) or follow one; only the pairs at the start assign values.

Generation is vectorised numpy and a function of the seed alone. :class:`MQARDataset` is
the training stream: row r of an endless, per-epoch shuffled pass over a fixed set of
examples, rebuilt exactly from (seed, split, r), so a resumed run reads the same rows.
Ids are the task's own (0 .. V - 1); ``fox_jax.evals.mqar`` offsets them for other models.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, NamedTuple, Optional

import numpy as np

from fox_jax.data.packing import Batch

VARIANTS = ("standard", "last_value")
IGNORE = -100
SPLITS = {"train": 0, "heldout": 1}
# Examples are generated (and cached) in blocks of this many, each from its own seed.
BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class Spec:
  """One MQAR example shape.

  vocab: V; keys are 0 .. V//2 - 1, values V//2 .. V - 1. seq_len: T tokens per example.
  num_kv_pairs: n distinct keys per example. variant: 'standard' or 'last_value'.
  num_updates: keys reassigned in 'last_value' (default max(1, n // 2)); 0 for 'standard'.
  power_a: the power law of the query offsets.
  """
  vocab: int
  seq_len: int
  num_kv_pairs: int
  variant: str = "standard"
  num_updates: Optional[int] = None
  power_a: float = 0.01

  @property
  def updates(self) -> int:
    """Keys reassigned per example (``num_updates`` resolved)."""
    if self.variant != "last_value":
      return 0
    return max(1, self.num_kv_pairs // 2) if self.num_updates is None else self.num_updates

  @property
  def context_len(self) -> int:
    """Tokens of the key-value pairs (and updates) before the query region."""
    return 2 * (self.num_kv_pairs + self.updates)

  @property
  def num_slots(self) -> int:
    """Even offsets in the query region where a query can go."""
    return (self.seq_len - self.context_len + 1) // 2

  def check(self, names: Optional[Mapping[str, str]] = None) -> "Spec":
    """Itself; ValueError naming the first bad field (as ``names[field]`` when given)."""
    name = lambda f: (names or {}).get(f, f)

    def need(ok, field, rule, value):
      if not ok:
        raise ValueError(f"{name(field)} must be {rule}, got {value!r}")

    is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)
    need(self.variant in VARIANTS, "variant", f"one of {VARIANTS}", self.variant)
    need(is_int(self.vocab) and self.vocab >= 4, "vocab", "an int >= 4", self.vocab)
    need(is_int(self.num_kv_pairs) and self.num_kv_pairs >= 1, "num_kv_pairs", "an int >= 1",
         self.num_kv_pairs)
    need(self.num_kv_pairs <= self.vocab // 2, "num_kv_pairs",
         f"at most the {self.vocab // 2} keys of {name('vocab')} {self.vocab}",
         self.num_kv_pairs)
    if self.num_updates is not None:
      if self.variant == "standard":
        need(self.num_updates == 0, "num_updates", "0 (or unset) with variant 'standard'",
             self.num_updates)
      else:
        need(is_int(self.num_updates) and 1 <= self.num_updates <= self.num_kv_pairs,
             "num_updates", f"an int in [1, {name('num_kv_pairs')}={self.num_kv_pairs}]",
             self.num_updates)
    need(isinstance(self.power_a, (int, float)) and not isinstance(self.power_a, bool)
         and math.isfinite(self.power_a) and self.power_a > 0, "power_a",
         "a finite number > 0", self.power_a)
    need(is_int(self.seq_len) and self.seq_len >= self.context_len + 2 * self.num_kv_pairs - 1,
         "seq_len", f"at least {self.context_len + 2 * self.num_kv_pairs - 1} for "
         f"{self.num_kv_pairs} key-value pairs" + (f" and {self.updates} updates"
                                                   if self.updates else ""), self.seq_len)
    return self


class Examples(NamedTuple):
  """inputs [N, T] int32; labels [N, T] int32: the answer at each query, -100 elsewhere."""
  inputs: np.ndarray
  labels: np.ndarray


def _sample_without_replacement(rng: np.random.Generator, shape: tuple[int, int], k: int,
                                weights: Optional[np.ndarray] = None) -> np.ndarray:
  """[N, k] distinct indices into ``range(shape[1])`` per row, in draw order: uniform, or
  successive draws proportional to ``weights`` (an exponential race: the i-th smallest of
  Exp(1) / w is the i-th draw)."""
  race = rng.random(shape) if weights is None else rng.exponential(size=shape) / weights
  pick = np.argpartition(race, k - 1, axis=1)[:, :k]
  order = np.argsort(np.take_along_axis(race, pick, axis=1), axis=1, kind="stable")
  return np.take_along_axis(pick, order, axis=1)


def query_weights(spec: Spec) -> np.ndarray:
  """[num_slots] the power-law weights of the query slots (normalised)."""
  p = np.arange(1, spec.num_slots + 1, dtype=np.float64) ** (spec.power_a - 1.0)
  return p / p.sum()


def generate(spec: Spec, num_examples: int, seed) -> Examples:
  """``num_examples`` examples of ``spec``, a function of ``seed`` (anything
  ``np.random.default_rng`` takes) alone."""
  spec.check()
  rng = np.random.default_rng(seed)
  N, T, n, u = int(num_examples), spec.seq_len, spec.num_kv_pairs, spec.updates
  half = spec.vocab // 2
  n_values = spec.vocab - half
  rows = np.arange(N)[:, None]
  keys = _sample_without_replacement(rng, (N, half), n)                        # [N, n]
  values = _sample_without_replacement(rng, (N, n_values), n) + half           # [N, n]
  pairs = [keys, values]
  final = values.copy()
  if u:
    which = _sample_without_replacement(rng, (N, n), u)                        # [N, u]
    old = np.take_along_axis(values, which, axis=1) - half
    new = (old + rng.integers(1, n_values, size=(N, u))) % n_values + half     # != old
    final[rows, which] = new
    pairs = [np.concatenate([keys, np.take_along_axis(keys, which, axis=1)], axis=1),
             np.concatenate([values, new], axis=1)]
  context = np.stack(pairs, axis=2).reshape(N, -1)                             # k v k v ...
  slots = _sample_without_replacement(rng, (N, spec.num_slots), n, query_weights(spec))
  inputs = np.concatenate(
      [context, rng.integers(0, spec.vocab, size=(N, T - spec.context_len))], axis=1)
  where = spec.context_len + 2 * slots                                         # [N, n]
  inputs[rows, where] = keys
  labels = np.full((N, T), IGNORE, np.int64)
  labels[rows, where] = final
  return Examples(inputs.astype(np.int32), labels.astype(np.int32))


def to_batch(examples: Examples, offset: int = 0) -> Batch:
  """A Batch [N, T] of examples, ids shifted by ``offset``: targets are the answers at the
  queries (weight 1) and the next input token elsewhere (weight 0; the last position,
  which has none, repeats its input); one segment per row, positions 0 .. T - 1."""
  inputs, labels = examples
  answer = labels != IGNORE
  nxt = np.concatenate([inputs[:, 1:], inputs[:, -1:]], axis=1)
  N, T = inputs.shape
  return Batch((inputs + offset).astype(np.int32),
               (np.where(answer, labels, nxt) + offset).astype(np.int32),
               np.ones((N, T), np.int32),
               np.broadcast_to(np.arange(T, dtype=np.int32), (N, T)).copy(),
               answer.astype(np.float32))


class MQARDataset:
  """An endless, exactly reproducible stream of MQAR rows over ``num_examples`` examples.

  Example i of a split is row i % BLOCK of block i // BLOCK, generated from the seed
  (seed, split, block); each epoch reads every example once, the blocks in an order and
  each block's rows in an order shuffled by (seed, split, epoch), so that a batch reads one
  or two blocks (the examples are independent draws: a block is as good a mix as any). Row
  r of the stream depends on nothing but r, so a resumed run reads on exactly.
  Same interface as ``PackedDataset``: ``seq_len``, ``row(index)``, ``rows(start, count)``.
  """

  def __init__(self, spec: Spec, num_examples: int, seed: int, split: str = "train",
               shuffle: bool = True):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if int(num_examples) < 1:
      raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    self.spec = spec.check()
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.split = split
    self.shuffle = shuffle

  @property
  def seq_len(self) -> int:
    return self.spec.seq_len

  @functools.lru_cache(maxsize=4)
  def _block(self, block: int) -> Examples:
    n = min(BLOCK, self.num_examples - block * BLOCK)
    return generate(self.spec, n, [self.seed, SPLITS[self.split], block])

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    """[num_examples] the example read at each row of ``epoch``."""
    if not self.shuffle:
      return np.arange(self.num_examples)
    rng = np.random.default_rng([self.seed, SPLITS[self.split], epoch, 1])
    starts = np.arange(0, self.num_examples, BLOCK)
    return np.concatenate([
        start + rng.permutation(min(BLOCK, self.num_examples - start))
        for start in starts[rng.permutation(len(starts))]])

  def examples(self, ids: np.ndarray) -> Examples:
    """Examples ``ids`` [K] of the split (each < num_examples), fields [K, T]."""
    ids = np.asarray(ids, np.int64)
    inputs = np.empty((len(ids), self.seq_len), np.int32)
    labels = np.empty_like(inputs)
    blocks = ids // BLOCK
    for b in np.unique(blocks):
      sel = np.flatnonzero(blocks == b)
      got = self._block(int(b))
      inputs[sel] = got.inputs[ids[sel] % BLOCK]
      labels[sel] = got.labels[ids[sel] % BLOCK]
    return Examples(inputs, labels)

  def rows(self, start: int, count: int) -> Batch:
    """Rows start .. start + count - 1 of the stream, fields [count, T]."""
    index = np.arange(int(start), int(start) + int(count), dtype=np.int64)
    epochs = index // self.num_examples
    ids = np.empty_like(index)
    for e in np.unique(epochs):
      sel = epochs == e
      ids[sel] = self._order(int(e))[index[sel] % self.num_examples]
    return to_batch(self.examples(ids))

  def row(self, index: int) -> Batch:
    """Row ``index`` of the stream, fields [T]."""
    return Batch(*(x[0] for x in self.rows(index, 1)))


# Config field of each Spec field (in ``config.data``), for one-line errors.
CONFIG_FIELDS = {"vocab": "config.data.mqar_vocab", "seq_len": "config.data.seq_len",
                 "num_kv_pairs": "config.data.mqar_num_kv_pairs",
                 "variant": "config.data.mqar_variant",
                 "num_updates": "config.data.mqar_num_updates",
                 "power_a": "config.data.mqar_power_a"}


def spec_from_config(data_cfg) -> Spec:
  """The Spec of a data config with source 'mqar'; ValueError naming the config field."""
  return Spec(vocab=data_cfg.mqar_vocab, seq_len=data_cfg.seq_len,
              num_kv_pairs=data_cfg.mqar_num_kv_pairs, variant=data_cfg.mqar_variant,
              num_updates=data_cfg.mqar_num_updates,
              power_a=data_cfg.mqar_power_a).check(CONFIG_FIELDS)


def dataset_from_config(data_cfg, split: str) -> MQARDataset:
  """The train or held-out stream of a data config with source 'mqar'."""
  count = data_cfg.mqar_train_examples if split == "train" else data_cfg.mqar_test_examples
  return MQARDataset(spec_from_config(data_cfg), count, data_cfg.seed, split)

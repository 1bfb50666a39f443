"""Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", 2023).

The classic prompt: an instruction, the filler "The grass is green. The sky is blue. ..."
repeated, "The pass key is N. Remember it. N is the pass key." at a depth (after a '.'),
more filler, then the query "What is the pass key? The pass key is". Each prompt is exactly
its length in tokens; lengths default to 1, 2 and 4 times the training length.

Scoring: exact match of the digits: the first run of digits in the greedy continuation must
equal the pass key (``trials`` random keys of ``digits`` digits per length and depth, fixed
by ``seed``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

import numpy as np

from fox_jax.errors import UsageError
from fox_jax.evals import common

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {key}. Remember it. {key} is the pass key."
QUERY = "\n\nWhat is the pass key? The pass key is"
SCORING = "exact match: the first run of digits in the greedy continuation equals the pass key"


@dataclasses.dataclass
class Options:
  train_length: int
  lengths: Optional[Sequence] = None  # tokens, or 'Mx'; default 1x, 2x, 4x
  depths: Sequence[float] = (0.0, 25.0, 50.0, 75.0, 100.0)
  trials: int = 2  # random pass keys per length and depth
  digits: int = 5
  seed: int = 0
  batch_size: int = 8

  def __post_init__(self):
    self.lengths = common.parse_lengths(self.lengths, self.train_length, (1, 2, 4))
    self.depths = common.check_depths(self.depths)
    for name, lo in (("trials", 1), ("digits", 1), ("batch_size", 1)):
      if int(getattr(self, name)) < lo:
        raise UsageError(f"passkey {name} must be >= {lo}, got {getattr(self, name)}")


def extract_digits(output: str) -> Optional[str]:
  """The first run of digits in ``output``, or None."""
  m = re.search(r"\d+", output)
  return m.group(0) if m else None


def score(passkey: str, output: str) -> int:
  return int(extract_digits(output) == passkey)


def prompts(tokenizer, options: Options) -> list[dict]:
  rng = np.random.default_rng(options.seed)
  pre = np.concatenate([common.bos(tokenizer), common.encode(tokenizer, INTRO)])
  filler = common.encode(tokenizer, FILLER)
  query, dot = common.encode(tokenizer, QUERY), common.encode(tokenizer, ".")
  cells = []
  for length in options.lengths:
    for depth in options.depths:
      for _ in range(options.trials):
        key = str(rng.integers(10 ** (options.digits - 1), 10 ** options.digits))
        ids, at = common.build_prompt(pre, filler, common.encode(tokenizer, KEY.format(key=key)),
                                      query, length, depth, dot)
        cells.append({"length": length, "depth": depth, "passkey": key, "ids": ids,
                      "inserted_at": at})
  return cells


def run(model, tokenizer, options: Options, *,
        generate_fn: Optional[common.GenerateFn] = None) -> dict:
  """Accuracy per length and per (depth, length). ``generate_fn`` as in ``needle.run``."""
  generate_fn = generate_fn or common.greedy_generate_fn(model)
  cells = prompts(tokenizer, options)
  n_new = options.digits + 4
  for length in options.lengths:
    group = [c for c in cells if c["length"] == length]
    new = common.generate_rows(generate_fn, np.stack([c["ids"] for c in group]), n_new,
                               options.batch_size)
    for c, toks in zip(group, new):
      c["output"] = common.decode_until_eos(tokenizer, toks)
      c["extracted"] = extract_digits(c["output"])
      c["score"] = int(c["extracted"] == c["passkey"])
  L, D = list(options.lengths), list(options.depths)
  grid = np.zeros((len(D), len(L)))
  for c in cells:
    grid[D.index(c["depth"]), L.index(c["length"])] += c["score"] / options.trials
  return {
      "task": "passkey", "options": common.options_dict(options), "scoring": SCORING,
      "max_new_tokens": n_new, "lengths": L, "depths": D,
      "grid": grid.tolist(),  # [depth][length] accuracy over the trials
      "accuracy_by_length": {str(l): float(grid[:, j].mean()) for j, l in enumerate(L)},
      "accuracy": float(grid.mean()),
      "cells": [{k: v for k, v in c.items() if k != "ids"} for c in cells],
  }


def plot(result: dict, path: str) -> None:
  label = result.get("label", "")
  o = result["options"]
  common.heatmap({"passkey": result["grid"]}, result["lengths"], result["depths"],
                 f"Passkey retrieval {label} ({o['digits']} digits, {o['trials']} keys per "
                 f"cell; train length {o['train_length']})", path, label="accuracy")

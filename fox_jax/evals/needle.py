"""Needle in a haystack, after the FoX authors' ``eval/niah`` (adapted from LongAlign).

Grid: context lengths x depths (default 11 x 11: lengths linspace(T/8, 4T), T the training
length, where the authors use linspace(1000, 32000) at T = 16k; depths linspace(0, 100)).
Each prompt is exactly its context length: [BOS] + haystack cut to fit, with the needle
inserted at the depth (moved back to the last boundary before it: a newline for the code
style, a '.' for the prose style, as the authors insert at a sentence end) + the query.

Modes, as the authors': ``standard`` inserts the needle as is; ``easy`` prefixes it with the
question. The query is completion-style: it ends where the answer starts, so that a base
model completes it. Greedy decoding with ``fox_jax.decode.generate``.

Deviations, stated in every result: the haystack is the run's held-out text (the built-in
corpus: Python source) instead of Paul Graham essays; scoring is exact match (1 if the answer
occurs in the greedy continuation, else 0) instead of a GPT-4o 1-10 judge; the continuation
is the answer's length plus a margin instead of 1024 tokens. The default ``code`` style puts
the authors' needle in the corpus's own form (``BEST_THING = "..."``, queried by
``assert BEST_THING == "``), as a byte model trained on Python source reads it; ``prose`` is
the authors' sentences verbatim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from fox_jax.errors import UsageError
from fox_jax.evals import common

ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
QUESTION = "What is the best thing to do in San Francisco?"

# style -> (needle by mode, query, insertion boundary)
STYLES = {
    "code": (
        {"standard": f'BEST_THING = "{ANSWER}"\n',
         "easy": f'# {QUESTION} Answer:\nBEST_THING = "{ANSWER}"\n'},
        f"\n# Answer the following question: {QUESTION}\nassert BEST_THING == \"",
        "\n"),
    "prose": (
        {"standard": f" The best thing to do in San Francisco is {ANSWER}.",
         "easy": f" {QUESTION} Answer: The best thing to do in San Francisco is {ANSWER}."},
        f"\n\nAnswer the following question: {QUESTION} Answer: The best thing to do in San "
        f"Francisco is",
        "."),
}
MODES = ("easy", "standard")
SCORING = ("exact match: 1 if the answer occurs verbatim in the greedy continuation, else 0 "
           "(the authors use a GPT-4o judge scoring 1-10)")


@dataclasses.dataclass
class Options:
  train_length: int
  lengths: Optional[Sequence] = None  # tokens, or 'Mx'; default: see grid_lengths
  depths: Sequence[float] = tuple(np.linspace(0, 100, 11).round(1).tolist())
  modes: Sequence[str] = MODES
  style: str = "code"
  max_new_tokens: Optional[int] = None  # default: the answer's length + 16
  batch_size: int = 8
  corpus: Any = None  # the haystack's corpus; default: the built-in held-out split

  def __post_init__(self):
    if self.lengths is not None:
      self.lengths = common.parse_lengths(self.lengths, self.train_length, ())
    self.depths = common.check_depths(self.depths)
    self.modes = tuple(self.modes)
    if not self.modes or any(m not in MODES for m in self.modes):
      raise UsageError(f"needle modes must be among {MODES}, got {list(self.modes)}")
    if self.style not in STYLES:
      raise UsageError(f"needle style must be one of {tuple(STYLES)}, got {self.style!r}")
    if self.max_new_tokens is not None and self.max_new_tokens < 1:
      raise UsageError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.batch_size < 1:
      raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")


def fixed_length(tokenizer, options: Options) -> int:
  """Tokens of a prompt that are not haystack (BOS, the longest needle, the query)."""
  needles, query, _ = STYLES[options.style]
  return (len(common.bos(tokenizer)) + len(common.encode(tokenizer, query))
          + max(len(common.encode(tokenizer, needles[m])) for m in options.modes))


def grid_lengths(tokenizer, options: Options) -> tuple[int, ...]:
  """``options.lengths``, or 11 lengths linspace(lo, 4T) with lo = T/8 (the authors' 1000
  at T = 16k, scaled), raised to the needle and query plus T/8 haystack tokens where they
  do not fit in T/8 (a byte model's needle alone is ~70 tokens)."""
  if options.lengths is not None:
    return tuple(options.lengths)
  T = int(options.train_length)
  lo = max(T / 8, fixed_length(tokenizer, options) + max(T / 8, 16))
  hi = max(4 * T, lo + 10)
  return tuple(int(round(x)) for x in np.linspace(lo, hi, 11))


def score(answer: str, output: str) -> int:
  """1 if ``answer`` occurs verbatim in ``output`` (the model's continuation), else 0."""
  return int(answer in output)


def prompts(tokenizer, options: Options, haystack: np.ndarray) -> list[dict]:
  """Every cell of the grid: mode, length, depth, prompt ids, insertion index."""
  needles, query, boundary = STYLES[options.style]
  q, b, pre = (common.encode(tokenizer, query), common.encode(tokenizer, boundary),
               common.bos(tokenizer))
  cells = []
  for mode in options.modes:
    needle = common.encode(tokenizer, needles[mode])
    for length in grid_lengths(tokenizer, options):
      for depth in options.depths:
        ids, at = common.build_prompt(pre, haystack, needle, q, length, depth, b)
        cells.append({"mode": mode, "length": length, "depth": depth, "ids": ids,
                      "inserted_at": at})
  return cells


def run(model, tokenizer, options: Options, *,
        generate_fn: Optional[common.GenerateFn] = None) -> dict:
  """The grid's exact-match scores. ``generate_fn`` (default: greedy decoding of ``model``)
  maps prompts [B, P] and a token count to the new tokens [B, N]."""
  generate_fn = generate_fn or common.greedy_generate_fn(model)
  corpus = options.corpus if options.corpus is not None else common.default_heldout_corpus()
  lengths = grid_lengths(tokenizer, options)
  haystack = common.corpus_text_ids(tokenizer, corpus, max(lengths))
  cells = prompts(tokenizer, options, haystack)
  n_new = options.max_new_tokens or len(common.encode(tokenizer, ANSWER)) + 16
  # Rows of one length share a shape: one batch (one compilation) per length.
  for length in lengths:
    group = [c for c in cells if c["length"] == length]
    new = common.generate_rows(generate_fn, np.stack([c["ids"] for c in group]), n_new,
                               options.batch_size)
    for c, toks in zip(group, new):
      c["output"] = common.decode_until_eos(tokenizer, toks)
      c["score"] = score(ANSWER, c["output"])
  L, D = list(lengths), list(options.depths)
  grids = {}
  for mode in options.modes:
    grid = np.zeros((len(D), len(L)))
    for c in cells:
      if c["mode"] == mode:
        grid[D.index(c["depth"]), L.index(c["length"])] = c["score"]
    grids[mode] = grid.tolist()
  return {
      "task": "needle", "options": common.options_dict(options), "answer": ANSWER,
      "scoring": SCORING, "max_new_tokens": n_new,
      "haystack": "held-out documents of the run's corpus, in corpus order",
      "lengths": L, "depths": D,
      "grid": grids,  # mode -> [depth][length] scores
      "accuracy": {m: float(np.mean(g)) for m, g in grids.items()},
      "cells": [{k: v for k, v in c.items() if k != "ids"} for c in cells],
  }


def plot(result: dict, path: str) -> None:
  label = result.get("label", "")
  common.heatmap(result["grid"], result["lengths"], result["depths"],
                 f"Needle in a haystack {label} (exact match, {result['options']['style']} "
                 f"style; train length {result['options']['train_length']})", path)

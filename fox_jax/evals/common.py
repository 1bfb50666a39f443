"""Pieces the evaluations share: the generation adapter, lengths, prompts with an inserted
passage, a heat map, and the held-out corpus as text.

Every evaluation module of ``fox_jax.evals`` has

  Options                       a dataclass of its settings (``train_length`` first)
  run(model, tokenizer, options, **adapters) -> dict   a JSON-serialisable result
  plot(result, path)            a PNG of the result

``model`` is a ``DecoderLM`` (or None where an adapter replaces it), ``tokenizer`` anything
with ``encode(text, add_bos=, add_eos=)`` and ``decode(ids)`` (``fox_jax.data.tokenizer``).
"""

from __future__ import annotations

import math

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from fox_jax.errors import UsageError

# prompt ids [B, P] int, max_new_tokens -> the new tokens [B, max_new_tokens].
GenerateFn = Callable[[np.ndarray, int], np.ndarray]


def greedy_generate_fn(model) -> GenerateFn:
  """Greedy decoding of ``model`` through ``fox_jax.decode.generate`` (prefill + cached
  steps, jitted; one compilation per prompt shape)."""
  import jax.numpy as jnp

  from fox_jax import decode

  def fn(prompt_ids, max_new_tokens):
    ids = jnp.asarray(prompt_ids, jnp.int32)
    out = decode.generate(model, ids, int(max_new_tokens))
    return np.asarray(out[:, ids.shape[1]:])
  return fn


def generate_rows(generate_fn: GenerateFn, prompts: np.ndarray, max_new_tokens: int,
                  batch_size: int) -> np.ndarray:
  """New tokens [N, max_new_tokens] of prompts [N, P], ``batch_size`` rows at a time; the
  last batch is padded with copies of its last row so that every call has one shape."""
  prompts = np.asarray(prompts)
  n = prompts.shape[0]
  b = max(1, min(int(batch_size), n))
  out = []
  for start in range(0, n, b):
    chunk = prompts[start:start + b]
    real = chunk.shape[0]
    if real < b:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - real, axis=0)])
    out.append(np.asarray(generate_fn(chunk, max_new_tokens))[:real])
  return np.concatenate(out)


def encode(tokenizer, text: str) -> np.ndarray:
  return np.asarray(tokenizer.encode(text, add_bos=False, add_eos=False), np.int64)


def decode_until_eos(tokenizer, ids) -> str:
  """The text of ``ids`` up to (not including) the first end-of-document token, so that
  digits or words generated after a document's end never join the answer."""
  ids = np.asarray(ids)
  eos = getattr(tokenizer, "EOS_ID", getattr(tokenizer, "eos_id", None))
  if eos is not None:
    hits = np.flatnonzero(ids == eos)
    if hits.size:
      ids = ids[:hits[0]]
  return tokenizer.decode(ids)


def bos(tokenizer) -> np.ndarray:
  """[BOS] if the tokenizer has one (as every training document starts), else []."""
  b = getattr(tokenizer, "BOS_ID", None)
  return np.asarray([] if b is None else [b], np.int64)


def parse_lengths(lengths: Optional[Sequence], train_length: int,
                  default: Sequence[float]) -> tuple[int, ...]:
  """Token lengths: ints, or strings 'N' / 'Mx' (M times the training length); None gives
  ``default`` multiples of the training length."""
  items = [f"{m}x" for m in default] if lengths is None else list(lengths)
  out = []
  for item in items:
    text = str(item).strip()
    try:
      value = (float(text[:-1]) * train_length) if text.endswith("x") else float(text)
    except ValueError:
      raise UsageError(f"length {item!r} is neither a token count nor a multiple of the "
                       f"training length like '4x'") from None
    if not math.isfinite(value) or value < 1 or (not text.endswith("x") and value != int(value)):
      raise UsageError(f"length {item!r} must be a positive number of tokens")
    out.append(int(round(value)))
  if not out:
    raise UsageError("no lengths given")
  if len(set(out)) != len(out):
    raise UsageError(f"lengths repeat: {out}")
  return tuple(out)


def check_depths(depths: Sequence[float]) -> tuple[float, ...]:
  out = tuple(float(d) for d in depths)
  if not out or any(not 0 <= d <= 100 for d in out):
    raise UsageError(f"depths must be percentages in [0, 100], got {list(depths)}")
  if len(set(out)) != len(out):
    raise UsageError(f"depths repeat: {list(out)}")
  return out


def insert_at_depth(haystack: np.ndarray, passage: np.ndarray, depth: float,
                    boundary: np.ndarray) -> tuple[np.ndarray, int]:
  """``haystack`` with ``passage`` inserted at ``depth`` percent of it, moved back to just
  after the last ``boundary`` token sequence before that point (the start if none), as the
  authors insert the needle at a sentence end. Returns (ids, insertion index)."""
  pos = int(round(len(haystack) * depth / 100.0))
  k = len(boundary)
  at = 0
  if k:
    for i in range(pos - k, -1, -1):
      if np.array_equal(haystack[i:i + k], boundary):
        at = i + k
        break
  return np.concatenate([haystack[:at], passage, haystack[at:]]), at


def build_prompt(prefix: np.ndarray, haystack: np.ndarray, passage: np.ndarray,
                 query: np.ndarray, length: int, depth: float, boundary: np.ndarray
                 ) -> tuple[np.ndarray, int]:
  """prefix + haystack (cut to fit) with ``passage`` at ``depth`` + query, exactly
  ``length`` tokens; (ids, insertion index in the haystack). UsageError when ``length``
  cannot hold the fixed parts and one haystack token."""
  budget = length - len(prefix) - len(passage) - len(query)
  if budget < 1:
    raise UsageError(f"length {length} is too short: the prompt's fixed parts take "
                     f"{length - budget} tokens (give lengths > {length - budget})")
  if len(haystack) < budget:
    reps = -(-budget // max(len(haystack), 1))
    haystack = np.tile(haystack, reps)
  body, at = insert_at_depth(haystack[:budget], passage, depth, boundary)
  ids = np.concatenate([prefix, body, query])
  assert len(ids) == length
  return ids, at


def corpus_text_ids(tokenizer, corpus, min_tokens: int) -> np.ndarray:
  """At least ``min_tokens`` ids of the corpus's documents as text (specials dropped),
  in corpus order, re-encoded with ``tokenizer``; repeated if the corpus is short."""
  pieces, total = [], 0
  for d in range(corpus.num_docs):
    doc = corpus.tokens[corpus.doc_starts[d]:corpus.doc_starts[d + 1]]
    ids = encode(tokenizer, tokenizer.decode(doc))
    pieces.append(ids)
    total += len(ids)
    if total >= min_tokens:
      break
  ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
  if len(ids) == 0:
    raise UsageError("the haystack corpus holds no text")
  return ids


def default_heldout_corpus():
  """The built-in corpus's held-out split with the default config's fraction."""
  from fox_jax import run_config
  from fox_jax.data import corpus_from_config
  return corpus_from_config(run_config.base_config().data, "heldout")


def options_dict(options) -> dict:
  """The JSON-serialisable fields of an Options dataclass (a corpus is left out)."""
  out = {}
  for f in dataclasses.fields(options):
    v = getattr(options, f.name)
    if f.name == "corpus":
      continue
    out[f.name] = list(v) if isinstance(v, tuple) else v
  return out


def heatmap(grids: dict, lengths: Sequence[int], depths: Sequence[float], title: str,
            path: str, *, label: str = "exact match", ylabel: str = "depth (%)") -> None:
  """One panel per entry of ``grids`` ({name: [depths][lengths] scores in [0, 1], NaN for a
  cell not evaluated}): depth (or what ``ylabel`` names) down, context length across, as in
  the authors' NIAH figures."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(grids)
  fig, axes = plt.subplots(1, n, figsize=(1.2 + 0.55 * len(lengths) * n + 1.5 * n,
                                          1.2 + 0.35 * len(depths)), dpi=120, squeeze=False)
  for ax, (name, grid) in zip(axes[0], grids.items()):
    im = ax.imshow(np.asarray(grid, np.float64), vmin=0.0, vmax=1.0, cmap="RdYlGn",
                   aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [str(int(x)) for x in lengths], rotation=60,
                  fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    values = np.asarray(grid, np.float64)
    mean = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    ax.set_title(f"{name}: {mean:.2f}", fontsize=9)
    fig.colorbar(im, ax=ax, label=label, fraction=0.046)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)

"""``FoxLM``: a fox-jax model behind lm-evaluation-harness's ``TemplateLM`` (lm_eval 0.4.13).

Importing this module imports ``lm_eval`` (a one-line UsageError naming the ``lm-eval``
extra when it is missing) and registers the model as ``fox`` in lm_eval's model registry;
``fox_jax.evals.harness`` imports it only when an evaluation runs.

What it does, as the FoX authors' ``HFLM(max_length=16384, batch_size=16,
add_bos_token=True)``:

* BOS first: every context is BOS + its tokens (lm_eval's empty context is BOS alone); a
  tokenizer without BOS falls back to EOS as the prefix, as HFLM does, and adds nothing.
* ``loglikelihood``: TemplateLM splits context and continuation; contexts longer than
  ``max_length`` lose tokens on the left (``(context + continuation)[-(max_length + 1):]``),
  and one forward pass per batch gives (sum of the continuation's log-probabilities, whether
  every continuation token is the argmax).
* ``loglikelihood_rolling``: the document's tokens (no BOS among them) in lm_eval's disjoint
  windows of ``max_length`` (``get_rolling_token_windows`` with BOS as the prefix token,
  ``make_disjoint_window``), scored as above and summed. HFLM with ``add_bos_token=True``
  also puts a BOS among the tokens to predict (its first window scores BOS after BOS); this
  scores the document's own tokens only, the first window from BOS.
* ``generate_until``: greedy, through ``fox_jax.decode.generate`` (prefill + cached steps),
  ``max_gen_toks`` tokens (default 256), the text cut at the end-of-document token and at the
  first ``until`` string; the context is left-truncated to ``max_length - max_gen_toks``.

Batching (``batch_size``): requests are sorted by length, longest first, like lm_eval's
Collator; every batch has ``batch_size`` rows (the last one padded) and is right-padded to
a bucket length (64 x 2^k, at least ``seq_chunk``-aligned, the smallest that holds the
batch's longest row), so a run compiles at most one scoring function per bucket. A causal
model's right padding changes no earlier position, except through ACP: with ``pruning`` the
threshold of each row is bounded over its padded length, so a score may move with its
bucket and batch-mates, by at most the pruned attention weight (epsilon, e^-10 by default). Generation batches rows of one prompt
length (prefill takes no padding mask), so it compiles once per prompt length.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from fox_jax import decode
from fox_jax.errors import UsageError
from fox_jax.evals.common import decode_until_eos
from fox_jax.model import cross_entropy

try:
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                    postprocess_generated_text)
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
  raise UsageError("the lm-evaluation-harness adapter needs the 'lm-eval' extra: "
                   "pip install 'fox-jax[lm-eval]' (lm_eval==0.4.13)") from None

BUCKET_BASE = 64      # the shortest bucket; buckets double from here
SCORE_CHUNK = 1024    # tokens per step of the LM head when the config sets no seq_chunk
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256


def bucket_lengths(max_length: int, seq_chunk: Optional[int] = None) -> tuple[int, ...]:
  """The padded lengths batches use: base x 2^k up to the first >= ``max_length``, where
  base is BUCKET_BASE rounded up to a multiple of ``seq_chunk`` (the model's token-wise
  layers need lengths divisible by it)."""
  base = BUCKET_BASE if not seq_chunk else math.lcm(BUCKET_BASE, int(seq_chunk))
  out = [base]
  while out[-1] < max_length:
    out.append(out[-1] * 2)
  return tuple(out)


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, state, inputs, targets):
  """(inputs [B, T], targets [B, T]) -> (log p(target) [B, T] float32, target is the argmax
  [B, T] bool) of the model ``nnx.merge(graphdef, state)``; the LM head runs SCORE_CHUNK
  (or seq_chunk) tokens at a time, so that no [B, T, V] logits exist. Jitted once per model
  structure and shape, shared by every FoxLM."""
  m = nnx.merge(graphdef, state)
  x = m.hidden(inputs)  # [B, T, d]
  B, T = inputs.shape
  C = m.cfg.seq_chunk or min(T, SCORE_CHUNK)

  def one(args):
    xc, tc = args  # [B, C, d], [B, C]
    logits = m.logits(xc)  # [B, C, V] float32
    return -cross_entropy(logits, tc), jnp.argmax(logits, axis=-1) == tc

  split = lambda a: jnp.moveaxis(a.reshape(B, T // C, C, *a.shape[2:]), 1, 0)
  logp, greedy = jax.lax.map(one, (split(x), split(targets)))
  merge = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, T)
  return merge(logp), merge(greedy)


def _positive_int(name: str, value) -> int:
  try:
    out = int(value)
    ok = out >= 1 and float(value) == out
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise UsageError(f"fox lm_eval model: {name} must be a positive integer, got {value!r}")
  return out


def _step(value) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UsageError(f"fox lm_eval model: step must be an integer, got {value!r}") from None


@register_model("fox")
class FoxLM(TemplateLM):
  """A ``DecoderLM`` and its tokenizer as an lm_eval model (see the module docstring).

  model, tokenizer: a ``DecoderLM`` (on one device, or placed by jit) and a tokenizer with
    ``encode(text, add_bos=, add_eos=)``, ``decode(ids)`` and ``BOS_ID`` / ``EOS_ID`` (a
    ``fox_jax.data.tokenizer.Tokenizer``, or that module: the byte tokenizer).
  path (instead of model and tokenizer, for ``--model fox --model_args path=DIR``): a run
    directory or a fox-convert checkpoint, read with ``fox_jax.loading.load_model``; step:
    a run's checkpoint step.
  max_length: tokens the model reads at once (default: a run's training length; a converted
    checkpoint records none, so it must be given). batch_size: rows per forward pass.
  max_gen_toks: generate_until's default number of new tokens.
  """

  def __init__(self, model=None, tokenizer=None, *, path: Optional[str] = None,
               step: Optional[int] = None, max_length: Optional[int] = None,
               batch_size=DEFAULT_BATCH_SIZE, max_gen_toks=DEFAULT_MAX_GEN_TOKS,
               add_bos_token: bool = True, **ignored):
    super().__init__()
    # lm_eval's CLI passes max_batch_size and device to every model; jit places the arrays.
    unknown = sorted(set(ignored) - {"max_batch_size", "device"})
    if unknown:
      raise UsageError(f"fox lm_eval model: unknown argument(s) {', '.join(unknown)} (it "
                       f"takes path, step, max_length, batch_size, max_gen_toks, "
                       f"add_bos_token)")
    if path is not None:
      if model is not None or tokenizer is not None:
        raise UsageError("fox lm_eval model: give either path or model and tokenizer")
      from fox_jax.evals import harness
      model, tokenizer, train_length = harness.load(
          str(path), None if step is None else _step(step))
      if max_length is None:
        if train_length is None:
          raise UsageError(f"{path} is a converted checkpoint, which records no training "
                           f"length: give max_length (the FoX authors used 16384)")
        max_length = train_length
    if model is None or tokenizer is None:
      raise UsageError("fox lm_eval model: give path=DIR (a run or a converted checkpoint)")
    if max_length is None:
      raise UsageError("fox lm_eval model: give max_length")
    self._model = model
    self.fox_tokenizer = tokenizer
    self._max_length = _positive_int("max_length", max_length)
    self._batch_size = _positive_int("batch_size", batch_size)
    self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
    if isinstance(add_bos_token, str):
      add_bos_token = add_bos_token.strip().lower() in ("1", "true", "yes")
    self.add_bos_token = bool(add_bos_token)
    self._bos = getattr(tokenizer, "BOS_ID", None)
    self._eos = getattr(tokenizer, "EOS_ID", getattr(tokenizer, "eos_id", None))
    if self._bos is None and self._eos is None:
      raise UsageError(f"the tokenizer {getattr(tokenizer, 'name', '')!r} has neither a BOS "
                       f"nor an EOS token to condition the first token on")
    self._vocab = int(model.cfg.vocab_size)
    self._buckets = bucket_lengths(self._max_length, model.cfg.seq_chunk)
    self._graphdef, self._state = nnx.split(model)

  # -- what lm_eval asks of a model ------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self._eos if self._eos is not None else self._bos

  @property
  def prefix_token_id(self) -> int:
    return self._bos if self._bos is not None else self._eos

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    tok = self.fox_tokenizer
    return str(getattr(tok, "name", None) or getattr(tok, "__name__", type(tok).__name__))

  def get_model_info(self) -> dict:
    return {"fox_max_length": self._max_length, "fox_batch_size": self._batch_size,
            "fox_add_bos_token": self.add_bos_token}

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 **kwargs) -> list[int]:
    """The ids of ``string``; BOS first when ``add_special_tokens`` is True, or None and
    add_bos_token (HFLM's rule)."""
    ids = np.asarray(self.fox_tokenizer.encode(string, add_bos=False, add_eos=False))
    ids = [int(i) for i in ids]
    add = self.add_bos_token if add_special_tokens is None else add_special_tokens
    if add and self._bos is not None:
      ids = [int(self._bos)] + ids
    bad = [i for i in ids if not 0 <= i < self._vocab]
    if bad:
      raise UsageError(f"the tokenizer gives id {bad[0]}, outside the model's vocabulary of "
                       f"{self._vocab} ({self.tokenizer_name} does not fit this model)")
    return ids

  def tok_decode(self, ids: Sequence[int]) -> str:
    return decode_until_eos(self.fox_tokenizer, np.asarray(list(ids), np.int64))

  # -- scoring -----------------------------------------------------------------------------

  def _bucket(self, length: int) -> int:
    for b in self._buckets:
      if b >= length:
        return b
    raise AssertionError(f"{length} tokens exceed the largest bucket {self._buckets[-1]}")

  def _rows(self, context: Sequence[int], continuation: Sequence[int]):
    """(inputs, targets, number of continuation tokens) of one request, left-truncated to
    max_length inputs as HFLM does."""
    if not continuation:
      raise ValueError("lm_eval asked to score an empty continuation")
    if len(continuation) > self._max_length:
      raise UsageError(f"a continuation of {len(continuation)} tokens is longer than "
                       f"max_length {self._max_length}")
    whole = (list(context) + list(continuation))[-(self._max_length + 1):]
    return whole[:-1], whole[1:], len(continuation)

  def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                   disable_tqdm: bool = True) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), is greedy) of each (context ids, continuation
    ids) pair: sorted longest first, ``batch_size`` rows per forward pass, each batch padded
    to its bucket; results in the order given."""
    rows = [self._rows(c, x) for c, x in pairs]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), tuple(rows[i][0])))
    out: list = [None] * len(rows)
    B = self._batch_size
    for start in tqdm(range(0, len(order), B), disable=disable_tqdm,
                      desc="fox: loglikelihood batches"):
      idx = order[start:start + B]
      T = self._bucket(max(len(rows[i][0]) for i in idx))
      inputs = np.zeros((B, T), np.int32)
      targets = np.zeros((B, T), np.int32)
      for r, i in enumerate(idx):
        inp, tgt, _ = rows[i]
        inputs[r, :len(inp)] = inp
        targets[r, :len(tgt)] = tgt
      logp, greedy = _score(self._graphdef, self._state, inputs, targets)
      logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
      for r, i in enumerate(idx):
        n_in, n_cont = len(rows[i][0]), rows[i][2]
        span = slice(n_in - n_cont, n_in)
        out[i] = (float(logp[r, span].sum()), bool(greedy[r, span].all()))
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """lm_eval's tokenised requests ((context, continuation), context ids, continuation
    ids) -> [(log-likelihood, is greedy)]."""
    results = self.score_tokens([(ctx, cont) for _, ctx, cont in requests],
                                disable_tqdm=disable_tqdm)
    for (key, _, _), res in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, res)
    return results

  def rolling_windows(self, string: str) -> list[tuple[list[int], list[int]]]:
    """lm_eval's disjoint (context, continuation) windows of a whole document."""
    tokens = self.tok_encode(string, add_special_tokens=False)
    return [make_disjoint_window(w) for w in get_rolling_token_windows(
        token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self._max_length,
        context_len=1)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """The log-likelihood of each whole document, summed over its windows."""
    windows, owner = [], []
    for n, req in enumerate(requests):
      (string,) = req.args
      for w in self.rolling_windows(string):
        windows.append(w)
        owner.append(n)
    scores = self.score_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for n, (logp, _) in zip(owner, scores):
      totals[n] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # -- generation --------------------------------------------------------------------------

  def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
    if not isinstance(gen_kwargs, dict):
      raise ValueError(f"generate_until: expected a dict of generation arguments, got "
                       f"{gen_kwargs!r}")
    kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
      asked = {k: gen_kwargs[k] for k in ("do_sample", "temperature") if k in gen_kwargs}
      raise UsageError(f"the fox lm_eval model decodes greedily; this task asks for "
                       f"sampling ({asked})")
    until = handle_stop_sequences(kwargs.get("until"), eos=None)
    max_new = _positive_int("max_gen_toks", kwargs["max_gen_toks"])
    if max_new >= self._max_length:
      raise UsageError(f"max_gen_toks {max_new} leaves no room for a context in max_length "
                       f"{self._max_length}")
    return until, max_new

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations of each context, cut at the first ``until`` string."""
    jobs = []
    for req in requests:
      context, gen_kwargs = req.args
      until, max_new = self._gen_settings(gen_kwargs)
      ids = self.tok_encode(context)[-(self._max_length - max_new):]
      jobs.append((ids, until, max_new))
    groups: dict = {}
    for i, (ids, _, max_new) in enumerate(jobs):
      groups.setdefault((len(ids), max_new), []).append(i)
    out: list = [None] * len(jobs)
    batches = [(key, members[s:s + self._batch_size])
               for key, members in sorted(groups.items(), key=lambda kv: -kv[0][0])
               for s in range(0, len(members), self._batch_size)]
    for (_, max_new), idx in tqdm(batches, disable=disable_tqdm,
                                  desc="fox: generate_until batches"):
      prompts = jnp.asarray(np.stack([jobs[i][0] for i in idx]), jnp.int32)
      new = np.asarray(decode.generate(self._model, prompts, max_new))[:, prompts.shape[1]:]
      for row, i in zip(new, idx):
        text = postprocess_generated_text(self.tok_decode(row), jobs[i][1], None)
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

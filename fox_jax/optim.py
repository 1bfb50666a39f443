"""The FoX authors' optimizer recipe in optax, with the schedule measured in tokens.

AdamW (b1 0.9, b2 0.95, eps 1e-8), weight decay on matrices only (not on biases, norm
scales or forget-gate biases), global-norm clipping at 1.0, linear warmup then cosine to
zero. Warmup and decay lengths are token counts and the rate of each step is a function of
the tokens seen before it, so changing the batch size (also when resuming) keeps the
schedule's shape over the data seen.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate(tokens: float, peak_lr: float, warmup_tokens: float,
                  end_tokens: float) -> float:
  """Linear warmup over ``warmup_tokens``, then cosine to zero at ``end_tokens``.

  ``tokens`` is where the update sits in the token stream (the middle of its batch), so
  neither the first update (warmup) nor the last (cosine end) gets a rate of exactly zero.
  Evaluated on the host in float64.
  """
  if end_tokens <= 0:
    raise ValueError("end_tokens must be positive")
  warmup = float(min(warmup_tokens, end_tokens))
  if tokens < warmup:
    return peak_lr * tokens / max(warmup, 1.0)
  progress = min(max((tokens - warmup) / max(float(end_tokens) - warmup, 1.0), 0.0), 1.0)
  return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))


def step_learning_rate(optim_cfg, tokens_seen: int, tokens_per_step: int) -> float:
  """The rate of the update that starts after ``tokens_seen`` tokens.

  The run takes whole steps until ``total_tokens`` are seen; the cosine ends with the last
  one: at tokens_seen + (steps left) * tokens_per_step. With a constant batch that is
  ceil(total_tokens / tokens_per_step) * tokens_per_step for every step; when a resumed run
  changes the batch or the token budget, the schedule continues from the tokens seen.
  """
  left = max(-(-(int(optim_cfg.total_tokens) - tokens_seen) // tokens_per_step), 1)
  end = tokens_seen + left * tokens_per_step
  return learning_rate(tokens_seen + 0.5 * tokens_per_step, float(optim_cfg.peak_lr),
                       float(optim_cfg.warmup_tokens), end)


def _path_names(path) -> list[str]:
  out = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    out.append(str(name))
  return out


# Parameter names that are never decayed whatever their rank: forget-gate and
# other gate biases may be stored with a per-head shape that is not a vector.
_NO_DECAY_WORDS = ("bias", "scale", "norm")


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: parameters of rank >= 2 that are not biases or norms.

  Biases and norm scales are vectors; gate biases may be [H] or [1, H]-like, so names
  containing 'bias', 'scale' or 'norm' are excluded too.
  """
  def one(path, x):
    names = [n.lower() for n in _path_names(path)]
    leaf = names[-1] if names else ""
    if leaf in ("value", "raw_value") and len(names) > 1:
      leaf = names[-2]
    if any(w in leaf for w in _NO_DECAY_WORDS):
      return False
    return jnp.ndim(x) >= 2
  return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
  """AdamW with clipping from an ``optim`` config block, at learning rate 1.

  The step multiplies the update by the rate of :func:`step_learning_rate`, which depends
  on the tokens seen rather than on a step count in the optimizer state. AdamW's update
  is -lr * (adam + weight_decay * p), so scaling the rate-1 update by lr is the same
  computation, bit for bit.
  """
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip_norm),
      optax.adamw(1.0, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay, mask=decay_mask),
  )

"""The FoX authors' optimizer recipe in optax, with the schedule measured in tokens.

AdamW (b1 0.9, b2 0.95, eps 1e-8), weight decay on matrices only (not on biases, norm
scales or forget-gate biases), global-norm clipping at 1.0, linear warmup then cosine to
zero. Warmup and decay lengths are token counts, so changing the batch size or sequence
length keeps the schedule's shape over the data seen.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def lr_schedule(peak_lr: float, warmup_tokens: float, total_tokens: float,
                tokens_per_step: int) -> optax.Schedule:
  """Learning rate at optimizer step ``count`` (0-based: the count-th update)."""
  if total_tokens <= 0 or tokens_per_step <= 0:
    raise ValueError("total_tokens and tokens_per_step must be positive")
  warmup = float(min(warmup_tokens, total_tokens))
  decay = max(float(total_tokens) - warmup, 1.0)

  def schedule(count):
    # The middle of this update's tokens: neither the first update (warmup) nor the last
    # (cosine end) gets a learning rate of exactly zero.
    tokens = (jnp.asarray(count, jnp.float32) + 0.5) * tokens_per_step
    warm = peak_lr * tokens / max(warmup, 1.0)
    progress = jnp.clip((tokens - warmup) / decay, 0.0, 1.0)
    cosine = 0.5 * peak_lr * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(tokens < warmup, warm, cosine)
  return schedule


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


def make_optimizer(optim_cfg, tokens_per_step: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) from an ``optim`` config block.

  The run takes whole steps, ceil(total_tokens / tokens_per_step) of them; the cosine ends
  with the last one.
  """
  steps = -(-int(optim_cfg.total_tokens) // tokens_per_step)
  schedule = lr_schedule(optim_cfg.peak_lr, optim_cfg.warmup_tokens, steps * tokens_per_step,
                         tokens_per_step)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip_norm),
      optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay, mask=decay_mask),
  )
  return tx, schedule

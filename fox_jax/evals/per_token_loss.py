"""Per-token loss against position, and length extrapolation.

The FoX paper's protocol on a small scale: held-out documents at least L tokens long are
read from their start (unpacked), the loss at each position 0..L-1 is averaged over
documents, and L goes past the training length T to show length extrapolation. Curves are
smoothed with a centred moving average for plotting. ``fox_jax.evaluate`` runs this on a
run directory (with the run's mesh and its validation loss).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from fox_jax.data import Batch, contiguous_windows
from fox_jax.errors import UsageError
from fox_jax.evals import common

# batch (Batch of [B, L] arrays) -> per-token losses times the batch's weights [B, L]
LossFn = Callable[[Batch], Any]


@dataclasses.dataclass
class Options:
  train_length: int
  lengths: Optional[Sequence] = None  # evaluated up to max(lengths) tokens; default 4x
  max_docs: int = 64
  batch_size: int = 8
  smooth: int = 21
  corpus: Any = None  # held-out documents; default: the built-in held-out split

  def __post_init__(self):
    self.lengths = common.parse_lengths(self.lengths, self.train_length, (4,))
    for name in ("max_docs", "batch_size", "smooth"):
      if int(getattr(self, name)) < 1:
        raise UsageError(f"per_token_loss {name} must be >= 1, got {getattr(self, name)}")


def loss_by_position(loss_fn: LossFn, windows: Batch, batch_size: int) -> np.ndarray:
  """Mean loss at each position [L] over the rows of ``windows`` [N, L]."""
  import jax.numpy as jnp
  total = np.zeros(windows.inputs.shape[1], np.float64)
  for start in range(0, windows.inputs.shape[0], batch_size):
    b = Batch(*(jnp.asarray(x[start:start + batch_size]) for x in windows))
    total += np.asarray(loss_fn(b), np.float64).sum(axis=0)
  return total / windows.inputs.shape[0]


def model_loss_fn(model) -> LossFn:
  """Per-token losses of ``model`` (a DecoderLM), jitted, on one device."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, batch):
    m = nnx.merge(graphdef, state)
    losses, _ = nnx.capture(m.token_losses, nnx.Intermediate)(
        batch.inputs, batch.targets, segment_ids=batch.segment_ids, positions=batch.positions)
    return losses * batch.weights
  return lambda batch: fn(state, batch)


def smooth(x: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average over ``window`` points, narrower near the ends.

  At index i the half-width is min(window // 2, i // 2): the first positions, which a
  log-scaled axis spreads out and where loss changes fastest, are barely averaged.
  """
  x = np.asarray(x, np.float64)
  csum = np.concatenate([[0.0], np.cumsum(x)])
  idx = np.arange(len(x))
  half = np.minimum(max(int(window), 1) // 2, idx // 2)
  lo, hi = idx - half, np.minimum(idx + half + 1, len(x))
  return (csum[hi] - csum[lo]) / (hi - lo)


def summary(curve: np.ndarray, train_length: int) -> dict:
  """Mean loss over early (first 1/8) and late (last 1/8) positions of the training length,
  and over the last training length's worth of positions beyond it, if evaluated."""
  T = train_length
  w = max(1, T // 8)
  out = {"loss_early": float(np.mean(curve[:w])), "loss_late": float(np.mean(curve[T - w:T]))}
  if len(curve) > T:
    out["loss_beyond"] = float(np.mean(curve[max(T, len(curve) - T):]))
  return out


def run(model, tokenizer, options: Options, *, loss_fn: Optional[LossFn] = None) -> dict:
  """Loss at every position up to max(options.lengths) over held-out documents.

  ``loss_fn`` (default: ``model``'s per-token losses on one device) lets a caller supply a
  sharded one; ``tokenizer`` is unused (the corpus is already tokenised). A ValueError when
  no held-out document is that long.
  """
  del tokenizer
  loss_fn = loss_fn or model_loss_fn(model)
  corpus = options.corpus if options.corpus is not None else common.default_heldout_corpus()
  T, length = int(options.train_length), max(options.lengths)
  windows = contiguous_windows(corpus, length, options.max_docs)
  curve = loss_by_position(loss_fn, windows, options.batch_size)
  return {"train_length": T, "eval_length": length, "num_docs": int(windows.inputs.shape[0]),
          "loss_by_position": curve.tolist(), "smooth": int(options.smooth),
          **summary(curve, T)}


def plot_results(results: Sequence[dict], path: str) -> None:
  """Smoothed loss against position of one or more runs; a line marks the training length."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  for r in results:
    curve = np.asarray(r["loss_by_position"])
    ax.plot(np.arange(1, len(curve) + 1), smooth(curve, r["smooth"]),
            label=r.get("label", "model"))
  train_lengths = sorted({r["train_length"] for r in results})
  for T in train_lengths:
    ax.axvline(T, color="grey", linestyle="--", linewidth=1)
  ax.set_xscale("log")
  ax.set_xlabel("token position (dashed: training length)")
  ax.set_ylabel("loss (nats / byte)")
  smooth_w = sorted({r["smooth"] for r in results})
  ax.set_title(f"Held-out loss vs position (moving average over up to {smooth_w[0]} tokens)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot(result: dict, path: str) -> None:
  plot_results([result], path)

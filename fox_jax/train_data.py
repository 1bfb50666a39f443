"""The data side of training: which rows of the global batch a process holds, the batch as
global arrays, the held-out rows and the validation loss over them.

A run's rows come from a loader of ``fox_jax.data`` (``datasets.train_loader``): this
process's *lanes* (rows of each step's global batch) in the order :func:`load_batch` lays
them out as [micro, B / micro, T]. Token ids are checked against the model's vocabulary as
they are read (an embedding would clamp them silently).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np

from fox_jax import sharding
from fox_jax.data import Batch, datasets
from fox_jax.data.packing import check_token_ids
from fox_jax.errors import UsageError

if TYPE_CHECKING:
  from fox_jax.train import Setup


def local_row_range(setup: Setup, global_batch: int, micro: int, seq_len: int) -> tuple[int, int]:
  """[lo, hi): the rows of each micro-batch that this process's devices hold.

  On one process that is every row; with several, each host reads only its share.
  """
  shape = (micro, global_batch // micro, seq_len)
  index = setup.batch_sharding().addressable_devices_indices_map(shape)
  lo = min(idx[1].start or 0 for idx in index.values())
  hi = max(shape[1] if idx[1].stop is None else idx[1].stop for idx in index.values())
  return lo, hi


def local_lanes(setup: Setup, global_batch: int, micro: int, seq_len: int) -> list[int]:
  """The rows of each step's global batch (row a * B / micro + r is row r of micro-batch a)
  that this process holds, in the order :func:`load_batch` lays them out."""
  per_micro = global_batch // micro
  lo, hi = local_row_range(setup, global_batch, micro, seq_len)
  return [a * per_micro + r for a in range(micro) for r in range(lo, hi)]


def load_batch(setup: Setup, loader, global_batch: int, micro: int) -> Batch:
  """The next step's rows from ``loader`` (``fox_jax.data.loader``; this process's
  :func:`local_lanes`) as global arrays [micro, B / micro, T]."""
  rows = next(loader)
  try:
    check_token_ids(rows, setup.model_cfg.vocab_size, "a training row")
  except ValueError as e:
    raise UsageError(f"config.data: {e}") from None
  T = rows.inputs.shape[-1]
  per_micro = global_batch // micro
  sh = setup.batch_sharding()
  return Batch(*(jax.make_array_from_process_local_data(
      sh, np.asarray(x).reshape(micro, -1, T), (micro, per_micro, T)) for x in rows))


def rows_loader(setup: Setup, dataset, position: int, global_batch: int, micro: int):
  """A loader of a random-access stream's rows from ``position`` on, for this process."""
  from fox_jax.data.loader import RowsLoader
  return RowsLoader(dataset, global_batch,
                    local_lanes(setup, global_batch, micro, dataset.seq_len), position)


def replicate(setup: Setup, x: np.ndarray) -> jax.Array:
  """Host data that every process holds in full, as one array replicated on the mesh."""
  return jax.make_array_from_callback(x.shape, sharding.replicated(setup.mesh),
                                      lambda index: x[index])


def validation_loss(setup: Setup, eval_fn, params, dataset, rows: int,
                    batch_size: int) -> float:
  """Weighted mean token loss over the first ``rows`` held-out rows (for packed text the
  mean over real tokens; for a synthetic task over its answers)."""
  total = count = 0.0
  for start in range(0, rows, batch_size):
    n = min(batch_size, rows - start)
    b = dataset.rows(start, n)
    losses = np.asarray(eval_fn(params, Batch(*(replicate(setup, x) for x in b))))
    total += float(losses.sum())
    count += float(np.sum(b.weights, dtype=np.float64))
  return total / max(count, 1.0)


def data_for_run(c: ml_collections.ConfigDict, lanes: list[int]):
  """The training loader of this process's ``lanes`` and the held-out rows of
  ``config.data`` (``fox_jax.data.datasets``)."""
  try:
    heldout = datasets.heldout_rows(c.data, c.run.val_rows)
    check_token_ids(heldout.rows(0, int(c.run.val_rows)), int(c.model.overrides.vocab_size),
                    "a held-out row")
    return datasets.train_loader(c.data, lanes), heldout
  except (ValueError, OSError) as e:
    raise UsageError(f"config.data ({c.data.source}"
                     f"{': ' + c.data.path if c.data.path else ''}): {e}") from None

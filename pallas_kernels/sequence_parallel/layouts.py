"""How a sequence of S tokens is laid out over the P devices of a mesh axis.

A layout is a permutation of the positions 0..S-1: device d holds the d-th block of S / P
entries of the permuted sequence. Every layout keeps each device's positions increasing,
which is all the attention kernels need (they mask and prune by global position and the
global cumulative gate, see ``common.Rows``):

  contiguous  device d holds positions [d L, (d + 1) L), L = S / P. The plain ring. Under
              causal attention device P - 1 does P times the work of device 0.
  zigzag      the sequence is cut into 2P chunks and device d holds chunks d and 2P - 1 - d
              (an early and a late one), so every device does the same causal work to
              within one chunk pair. Needs S divisible by 2P.
  striped     stripes of ``stripe`` consecutive tokens go round the devices: stripe s on
              device s mod P. With stripe = 1 (token i on device i mod P, Brandon et al.'s
              Striped Attention) every device does the same work to within one token per
              pair; wider stripes keep runs of neighbouring tokens together (a model's
              key/value shift then needs one token from another device per stripe, not per
              token) at the price of up to one stripe of imbalance per step. Needs S
              divisible by P x stripe.

A model permutes its inputs once (tokens, targets, segment ids, positions, loss weights)
with :func:`permute` and its per-token outputs back with :func:`unpermute`; everything
between is per token except attention, whose sequence-parallel op takes the layout, and a
token shift (FoX Pro's key/value shift), which takes each token's predecessor in natural
order from wherever it lives (:func:`previous_tokens`, a halo of one token per run).
Adding a layout costs one function that returns its order and one line in ``_ORDERS``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _contiguous(S: int, P: int, stripe: int) -> np.ndarray:
  return np.arange(S)


def _zigzag(S: int, P: int, stripe: int) -> np.ndarray:
  chunks = np.arange(S).reshape(2 * P, S // (2 * P))
  return np.concatenate([np.concatenate([chunks[d], chunks[2 * P - 1 - d]]) for d in range(P)])


def _striped(S: int, P: int, stripe: int) -> np.ndarray:
  # [stripes per device, P, stripe] -> device-major
  return np.arange(S).reshape(S // (P * stripe), P, stripe).transpose(1, 0, 2).reshape(S)


# name -> (order(S, P, stripe), what S must be divisible by, length of a run of consecutive
# positions on one device)
_ORDERS = {
    "contiguous": (_contiguous, lambda P, w: P, lambda S, P, w: S // P),
    "zigzag": (_zigzag, lambda P, w: 2 * P, lambda S, P, w: S // (2 * P)),
    "striped": (_striped, lambda P, w: P * w, lambda S, P, w: w),
}
LAYOUTS = tuple(_ORDERS)


def _int(value, name: str, minimum: int = 1) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The layout ``name`` of a sequence of ``length`` tokens over ``num_shards`` devices.

  Raises a ValueError naming the argument when the length cannot be split that way.
  """

  name: str
  length: int
  num_shards: int
  stripe: int = 1

  def __post_init__(self):
    if self.name not in _ORDERS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.name!r}")
    _int(self.length, "sequence length")
    _int(self.num_shards, "number of shards")
    _int(self.stripe, "stripe")
    if self.stripe != 1 and self.name != "striped":
      raise ValueError(f"stripe applies to the 'striped' layout only, got stripe={self.stripe} "
                       f"with {self.name!r}")
    div = _ORDERS[self.name][1](self.num_shards, self.stripe)
    if self.length % div:
      what = {"contiguous": "the number of shards", "zigzag": "2 x the number of shards",
              "striped": "the number of shards x stripe"}[self.name]
      raise ValueError(f"sequence length {self.length} must be divisible by {what} = {div} "
                       f"for the {self.name!r} layout over {self.num_shards} devices")

  @property
  def shard_length(self) -> int:
    return self.length // self.num_shards

  @property
  def run_length(self) -> int:
    """Every device's positions are runs of this many consecutive positions."""
    return _ORDERS[self.name][2](self.length, self.num_shards, self.stripe)

  @functools.cached_property
  def order(self) -> np.ndarray:
    """[S] the natural position at each index of the laid-out sequence (int32)."""
    return _ORDERS[self.name][0](self.length, self.num_shards, self.stripe).astype(np.int32)

  @functools.cached_property
  def inverse(self) -> np.ndarray:
    """[S] the index in the laid-out sequence of each natural position."""
    inv = np.empty(self.length, np.int32)
    inv[self.order] = np.arange(self.length, dtype=np.int32)
    return inv

  def shard_positions(self) -> np.ndarray:
    """[P, S / P] the natural positions each device holds, increasing along each row."""
    return self.order.reshape(self.num_shards, self.shard_length)

  @functools.cached_property
  def predecessors(self) -> "_Halo":
    """Where the token before each device's runs lives (see :func:`previous_tokens`)."""
    P, L, R = self.num_shards, self.shard_length, self.run_length
    n = L // R
    dev = np.zeros((P, n), np.int64)
    run = np.zeros((P, n), np.int32)
    has = np.zeros((P, n), bool)
    for d in range(P):
      for j in range(n):
        first = int(self.order[d * L + j * R])  # natural position opening this run
        if first == 0:
          continue
        where = int(self.inverse[first - 1])    # laid-out index of its predecessor
        dev[d, j] = (d - where // L) % P        # it is on the device `offset` steps back
        run[d, j] = (where % L) // R            # as the last token of that device's run
        has[d, j] = True
    offsets = tuple(sorted({int(o) for o in dev[has]})) or (0,)
    which = np.searchsorted(np.asarray(offsets), dev).astype(np.int32)
    return _Halo(offsets, np.where(has, which, 0).astype(np.int32), run, has)


@dataclasses.dataclass(frozen=True)
class _Halo:
  """For device d's j-th run: its predecessor is the last token of run ``run[d, j]`` on the
  device ``offsets[which[d, j]]`` steps back round the axis; ``has[d, j]`` is False for the
  run that opens the sequence."""
  offsets: tuple[int, ...]
  which: np.ndarray
  run: np.ndarray
  has: np.ndarray


def previous_tokens(x: jax.Array, layout: Layout, axis_name, axis: int = 1) -> jax.Array:
  """Each token's predecessor in natural order, zero for position 0; call inside
  ``shard_map`` with ``x`` this device's part [..., S / P, ...] (``axis``) of a sequence in
  ``layout``'s order over the mesh axis ``axis_name``.

  Inside a run of consecutive positions the predecessor is the token before; the first
  token of each run takes the last token of the run before it in natural order, from the
  device holding it: one ``ppermute`` of the runs' last tokens per distinct device offset
  (one for contiguous and striped, two for zigzag), so the traffic is one token per run.
  """
  P, L, R = layout.num_shards, layout.shard_length, layout.run_length
  n = L // R
  halo = layout.predecessors
  x = jnp.moveaxis(x, axis, 1)
  if x.shape[1] != L:
    raise ValueError(f"previous_tokens: this device's part has {x.shape[1]} tokens along "
                     f"axis {axis}, the layout {L}")
  b, rest = x.shape[0], x.shape[2:]
  runs = x.reshape((b, n, R) + rest)
  lasts = runs[:, :, -1]                                     # [b, n, ...]
  received = jnp.stack([
      lasts if d == 0 else lax.ppermute(lasts, axis_name, [(s, (s + d) % P) for s in range(P)])
      for d in halo.offsets])                                # [offsets, b, n, ...]
  me = lax.axis_index(axis_name)
  which, run, has = (jnp.asarray(t)[me] for t in (halo.which, halo.run, halo.has))  # [n]
  first = jnp.moveaxis(received[which, :, run], 0, 1)        # [b, n, ...]
  has = has.reshape((1, n) + (1,) * len(rest))
  first = jnp.where(has, first, jnp.zeros_like(first))
  prev = jnp.concatenate([first[:, :, None], runs[:, :, :-1]], axis=2)
  return jnp.moveaxis(prev.reshape((b, L) + rest), 1, axis)


def permute(x: jax.Array, layout: Layout, axis: int = 1) -> jax.Array:
  """Natural order -> the layout's order along ``axis`` (of length ``layout.length``)."""
  _check_axis(x, layout, axis)
  return jnp.take(x, layout.order, axis=axis)


def unpermute(x: jax.Array, layout: Layout, axis: int = 1) -> jax.Array:
  """The layout's order -> natural order along ``axis``: the inverse of :func:`permute`."""
  _check_axis(x, layout, axis)
  return jnp.take(x, layout.inverse, axis=axis)


def _check_axis(x, layout: Layout, axis: int):
  shape = getattr(x, "shape", None)
  if shape is None or not -len(shape) <= axis < len(shape):
    raise ValueError(f"axis {axis} is out of range for an array of shape {shape}")
  if shape[axis] != layout.length:
    raise ValueError(f"axis {axis} has length {shape[axis]}, but the layout is for "
                     f"{layout.length} tokens")

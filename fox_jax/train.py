"""Training: sharded state, the jitted step, and the loop with checkpoints and metrics.

The train state is a plain dict of arrays (orbax and optax need nothing else):

  step       int32 []: optimizer updates applied
  params     the model's nnx.Param values as a nested dict (float32)
  opt_state  optax AdamW state over ``params``
  rng        uint32 [2]: key data, advanced every step for stochastic layers

One step takes a batch [A, B, T] of A micro-batches, accumulates gradients over them
with ``lax.scan``, clips, and applies AdamW; its loss is the mean over all non-padding
tokens of the A * B rows, so accumulation changes memory, not the result. A step whose
loss or gradient norm is not finite returns the state unchanged and says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from fox_jax import checkpoint as ckpt_lib
from fox_jax import metrics as metrics_lib
from fox_jax import optim
from fox_jax import run_config
from fox_jax import sharding
from fox_jax.config import ModelConfig, get_preset
from fox_jax.data import Batch, PackedDataset, corpus_from_config
from fox_jax.model import DecoderLM


class NonFiniteError(RuntimeError):
  """Raised when a step's loss or gradient is not finite; ``step`` is that step (1-based)."""

  def __init__(self, step: int, last_good: Optional[int]):
    self.step, self.last_good = step, last_good
    super().__init__(f"non-finite loss or gradient at step {step}; "
                     f"last good checkpoint is step {last_good}")


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig named by ``c.model`` (preset plus overrides)."""
  overrides = c.model.overrides.to_dict() if c.model.get("overrides") else {}
  return get_preset(c.model.preset, **overrides)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy [B, T] float32 of logits [B, T, V] against targets [B, T]."""
  logits = logits.astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _tile_counts(intermediates) -> tuple[jax.Array, jax.Array]:
  """Sum of (kept, total) tiles over every 'attention_tiles' the model sowed."""
  kept = total = jnp.zeros((), jnp.float32)
  flat = nnx.to_flat_state(intermediates) if intermediates is not None else []
  for path, var in flat:
    if path and path[-1] == "attention_tiles":
      for pair in var.get_value():
        kept += jnp.sum(pair[0]).astype(jnp.float32)
        total += jnp.sum(pair[1]).astype(jnp.float32)
  return kept, total


@dataclasses.dataclass
class Setup:
  """Everything a run needs that does not change during it."""
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: Any
  abstract_params: Any          # nnx.State of ShapeDtypeStructs (with logical metadata)
  rest: Any                     # non-parameter model state (nnx.State)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: Any
  abstract_state: Any
  num_params: int
  flops_per_token: float

  def model(self, params) -> nnx.Module:
    """The model with parameters ``params`` (nested dict), usable inside jit."""
    state = jax.tree.map(lambda x: x, self.abstract_params,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state, self.rest, copy=True)

  def batch_sharding(self):
    return sharding.batch_sharding(self.mesh, 3, leading_unsharded=1)

  # Compiled functions live with the setup, so runs and evaluations in one process that
  # share a config (a resumed run, evaluation after training) compile them once.
  @functools.cached_property
  def train_step(self) -> Callable:
    return jit_train_step(self)

  @functools.cached_property
  def eval_fn(self) -> Callable:
    return make_eval_fn(self)


_SETUPS: dict = {}


def build(c: ml_collections.ConfigDict, devices=None) -> Setup:
  """Mesh, abstract model, optimizer and shardings for config ``c`` (cached per config)."""
  devices = tuple(jax.devices() if devices is None else devices)
  # The run and eval blocks change no compiled function, so they are not part of the key.
  blocks = {k: c[k].to_dict() for k in ("model", "data", "optim", "mesh")}
  key = (json.dumps(blocks, sort_keys=True, default=str), devices)
  if key not in _SETUPS:
    _SETUPS[key] = _build(c, devices)
  return _SETUPS[key]


def _build(c: ml_collections.ConfigDict, devices) -> Setup:
  run_config.validate(c)
  mcfg = model_config(c)
  mesh = sharding.make_mesh(c.mesh.to_dict(), devices)
  with sharding.activation_rules(mesh):
    abstract_model = nnx.eval_shape(lambda: DecoderLM(mcfg, rngs=nnx.Rngs(0)))
    # Non-trainable state (e.g. a 'fixed' forget gate's constants) is needed as values;
    # XLA drops the unused parameter initialisers from this function.
    rest = jax.jit(lambda: nnx.split(DecoderLM(mcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2])()
  graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
  pure_params = nnx.to_pure_dict(abstract_params)
  tx, schedule = optim.make_optimizer(c.optim, run_config.tokens_per_step(c))
  abstract_opt = jax.eval_shape(tx.init, pure_params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated)
  state_shardings = {"step": replicated, "params": param_shardings,
                     "opt_state": opt_shardings, "rng": replicated}
  abstract_state = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": pure_params, "opt_state": abstract_opt,
      "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  abstract_state = ckpt_lib.abstract_like(abstract_state, state_shardings)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pure_params))
  # The input embedding is a lookup, not a matmul; an untied output head is a matmul.
  matmul_params = num_params - mcfg.vocab_size * mcfg.d_model
  fpt = metrics_lib.flops_per_token(matmul_params, mcfg.num_layers, mcfg.num_heads,
                                    mcfg.head_dim, c.data.seq_len)
  return Setup(c, mcfg, mesh, graphdef, abstract_params, rest, tx, schedule,
               state_shardings, abstract_state, num_params, fpt)


def init_state(setup: Setup, seed: int) -> dict:
  """A fresh train state, created directly in its shardings."""

  def init(key):
    init_key, rng = jax.random.split(key)
    model = DecoderLM(setup.model_cfg, rngs=nnx.Rngs(init_key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": setup.tx.init(params), "rng": jax.random.key_data(rng)}

  with sharding.activation_rules(setup.mesh):
    return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.key(seed))


def loss_sums(setup: Setup, params, batch: Batch):
  """(sum of token losses, number of tokens, kept tiles, total tiles) of a batch [B, T]."""
  model = setup.model(params)
  logits, intermediates = nnx.capture(model, nnx.Intermediate)(
      batch.inputs, segment_ids=batch.segment_ids, positions=batch.positions)
  mask = (batch.segment_ids > 0).astype(jnp.float32)                       # [B, T]
  losses = token_losses(logits, batch.targets) * mask                       # [B, T]
  kept, total = _tile_counts(intermediates)
  return jnp.sum(losses), jnp.sum(mask), kept, total


def make_train_step(setup: Setup) -> Callable:
  """The step as a pure function (state, batch [A, B, T]) -> (state, metrics)."""

  def step(state, batch: Batch):
    params = state["params"]
    count = jnp.maximum(jnp.sum(batch.segment_ids > 0).astype(jnp.float32), 1.0)

    def micro_loss(p, mb):
      loss_sum, _, kept, total = loss_sums(setup, p, mb)
      return loss_sum / count, (kept, total)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, mb):
      grads, loss, kept, total = carry
      (l, (k, t)), g = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, grads, g), loss + l, kept + k, total + t), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32))
    (grads, loss, kept, total), _ = jax.lax.scan(accumulate, init, batch)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
    new = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step changes nothing, so the state in hand is the last good one.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": setup.schedule(state["step"]),
               "finite": finite, "kept_tiles": kept, "total_tiles": total}
    return new, metrics

  return step


def jit_train_step(setup: Setup) -> Callable:
  """The step jitted with explicit shardings; the input state is donated."""
  batch_sh = Batch(*([setup.batch_sharding()] * 4))
  jitted = jax.jit(make_train_step(setup),
                   in_shardings=(setup.state_shardings, batch_sh),
                   out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                   donate_argnums=(0,))

  def run(state, batch):
    with sharding.activation_rules(setup.mesh):
      return jitted(state, batch)
  return run


def make_eval_fn(setup: Setup) -> Callable:
  """params, batch [B, T] -> per-token losses [B, T] (0 on padding), jitted."""
  def fn(params, batch: Batch):
    model = setup.model(params)
    # Captured (and dropped) so a pruning model's tile counts have somewhere to go.
    logits, _ = nnx.capture(model, nnx.Intermediate)(
        batch.inputs, segment_ids=batch.segment_ids, positions=batch.positions)
    return token_losses(logits, batch.targets) * (batch.segment_ids > 0)
  # Replicated output: every process can read all of it, also when the mesh spans hosts.
  jitted = jax.jit(fn, out_shardings=sharding.replicated(setup.mesh))

  def run(params, batch):
    with sharding.activation_rules(setup.mesh):
      return jitted(params, batch)
  return run


def local_row_range(setup: Setup, global_batch: int, micro: int, seq_len: int) -> tuple[int, int]:
  """[lo, hi): the rows of each micro-batch that this process's devices hold.

  On one process that is every row; with several, each host reads only its share.
  """
  shape = (micro, global_batch // micro, seq_len)
  index = setup.batch_sharding().addressable_devices_indices_map(shape)
  lo = min(idx[1].start or 0 for idx in index.values())
  hi = max(shape[1] if idx[1].stop is None else idx[1].stop for idx in index.values())
  return lo, hi


def load_batch(setup: Setup, dataset: PackedDataset, position: int, global_batch: int,
               micro: int) -> Batch:
  """Rows position .. position + global_batch - 1 as global arrays [micro, B / micro, T]."""
  T = dataset.seq_len
  per_micro = global_batch // micro
  lo, hi = local_row_range(setup, global_batch, micro, T)
  parts = [dataset.rows(position + a * per_micro + lo, hi - lo) for a in range(micro)]
  sh = setup.batch_sharding()
  return Batch(*(jax.make_array_from_process_local_data(
      sh, np.stack(field), (micro, per_micro, T)) for field in zip(*parts)))


def replicate(setup: Setup, x: np.ndarray) -> jax.Array:
  """Host data that every process holds in full, as one array replicated on the mesh."""
  return jax.make_array_from_callback(x.shape, sharding.replicated(setup.mesh),
                                      lambda index: x[index])


def validation_loss(setup: Setup, eval_fn, params, dataset: PackedDataset, rows: int,
                    batch_size: int) -> float:
  """Mean token loss over the first ``rows`` packed held-out rows."""
  total = count = 0.0
  for start in range(0, rows, batch_size):
    n = min(batch_size, rows - start)
    b = dataset.rows(start, n)
    losses = np.asarray(eval_fn(params, Batch(*(replicate(setup, x) for x in b))))
    total += float(losses.sum())
    count += float((b.segment_ids > 0).sum())
  return total / max(count, 1.0)


class _StopSignal:
  """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def save_config(c: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config saved by a run in ``workdir``."""
  with open(os.path.join(workdir, "config.json")) as f:
    c = ml_collections.ConfigDict(json.load(f))
  c.eval.length_multiples = tuple(c.eval.length_multiples)
  return c


@dataclasses.dataclass
class TrainResult:
  status: str                 # "done" | "preempted"
  step: int
  state: Any
  val_loss: Optional[float]


def train(c: ml_collections.ConfigDict, workdir: str, *, max_steps: Optional[int] = None,
          devices=None) -> TrainResult:
  """Trains (or resumes, if ``workdir`` holds a checkpoint) until the configured tokens.

  ``max_steps`` stops earlier (after a checkpoint), e.g. to split a run. SIGTERM saves a
  checkpoint and returns with status "preempted". A non-finite step saves the state
  before it, if not saved yet, and raises :class:`NonFiniteError`.
  """
  setup = build(c, devices)
  is_main = jax.process_index() == 0
  if is_main:
    save_config(c, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir, c.run.keep_checkpoints)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  train_data = PackedDataset(corpus_from_config(c.data, "train"), c.data.seq_len, c.data.seed)
  heldout = PackedDataset(corpus_from_config(c.data, "heldout"), c.data.seq_len, c.data.seed)
  step_fn, eval_fn = setup.train_step, setup.eval_fn

  latest = checkpointer.latest_step()
  if latest is None:
    state, position = init_state(setup, c.run.seed), 0
  else:
    state, meta = checkpointer.restore(latest, setup.abstract_state)
    position = int(meta["data_position"])
  step = int(state["step"])
  last_saved = latest
  total = run_config.total_steps(c)
  stop_at = total if max_steps is None else min(total, max_steps)
  B, micro = c.data.global_batch, c.optim.grad_accum
  tokens_per_step = run_config.tokens_per_step(c)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0], c.run.peak_flops_per_device)

  def save(at_step, at_state):
    nonlocal last_saved
    if last_saved != at_step:
      checkpointer.save(at_step, at_state, {"step": at_step, "data_position": at_step * B})
      last_saved = at_step

  bar = tqdm(total=stop_at, initial=step, disable=not (is_main and c.run.progress_bar),
             dynamic_ncols=True, desc="train")
  status, val_loss = "done", None
  window_start, window_steps = time.perf_counter(), 0
  try:
    with _StopSignal() as stop:
      while step < stop_at:
        if stop.received:
          status = "preempted"
          break
        state, m = step_fn(state, load_batch(setup, train_data, position, B, micro))
        if not bool(m["finite"]):
          save(step, state)
          checkpointer.wait()
          raise NonFiniteError(step + 1, last_saved)
        step += 1
        position += B
        window_steps += 1
        bar.update(1)
        if step % c.run.log_every == 0 or step == stop_at:
          m = jax.device_get(m)
          elapsed = time.perf_counter() - window_start
          tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
          scalars = {"loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                     "tokens_per_s": tok_s, "tokens": step * tokens_per_step}
          if peak:
            scalars["mfu"] = setup.flops_per_token * tok_s / (peak * len(setup.mesh.devices.flat))
          if m["total_tiles"] > 0:
            scalars["kept_tile_fraction"] = m["kept_tiles"] / m["total_tiles"]
          writer.write(step, scalars)
          bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{tok_s:,.0f}")
          window_start, window_steps = time.perf_counter(), 0
        if c.run.eval_every and step % c.run.eval_every == 0 and step < stop_at:
          v = validation_loss(setup, eval_fn, state["params"], heldout, c.run.val_rows,
                              c.eval.batch_size)
          writer.write(step, {"val_loss": v})
        if step % c.run.checkpoint_every == 0:
          save(step, state)
      save(step, state)
      if status == "done" and step == total:
        val_loss = validation_loss(setup, eval_fn, state["params"], heldout, c.run.val_rows,
                                   c.eval.batch_size)
        writer.write(step, {"val_loss": val_loss})
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  return TrainResult(status, step, state, val_loss)

"""Training: sharded state, the jitted step, and the loop with checkpoints and metrics.

The train state is a plain dict of arrays (orbax and optax need nothing else):

  step       int32 []: optimizer updates applied
  params     the model's nnx.Param values as a nested dict (float32)
  opt_state  optax AdamW state over ``params``
  rng        uint32 [2]: key data, advanced every step for stochastic layers

One step takes a batch [A, B, T] of A micro-batches, accumulates gradients over them
with ``lax.scan``, clips, and applies AdamW; its loss is the mean over all tokens of the
A * B rows weighted by ``Batch.weights`` (packed text: every non-padding token; MQAR: the
answers), so accumulation changes memory, not the result. Its learning
rate is an argument, computed on the host from the tokens seen (``optim.step_learning_rate``).
A step whose loss, gradient norm, new parameters or new optimizer state are not all finite
returns the state unchanged and says so, so the state in hand is always finite.

:func:`train` owns the run directory while it runs (``fox_jax.rundir``: a lock, the saved
config and its history, metrics truncated to the restored step) and reports what a user
can act on as ``UsageError`` before anything is written, and what stops a started run as
``RunError`` after saving what can be saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
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
from fox_jax import context as context_lib
from fox_jax import metrics as metrics_lib
from fox_jax import optim
from fox_jax import run_config
from fox_jax import rundir
from fox_jax import sharding
from fox_jax.config import ModelConfig, get_preset
from fox_jax.data import Batch, datasets
# The data side of the loop (a process's rows, the global batch, the validation loss),
# re-exported: ``train.load_batch`` etc. stay where callers found them.
from fox_jax.train_data import (data_for_run, load_batch, local_lanes, local_row_range,  # noqa: F401
                                replicate, rows_loader, validation_loss)
from fox_jax.errors import RunError, UsageError
from fox_jax.signals import Interrupted, StopSignals
from fox_jax.model import DecoderLM, cross_entropy


class NonFiniteError(RunError):
  """A step whose loss, gradient or update is not finite; ``step`` is that step (1-based).

  The step was not applied; ``last_good`` is the checkpoint holding the state before it
  (None when the very first step failed: there is no trained state to keep).
  """

  def __init__(self, step: int, last_good: Optional[int]):
    self.step, self.last_good = step, last_good
    kept = (f"last good checkpoint is step {last_good}" if last_good is not None
            else "no checkpoint was saved (the first step failed)")
    super().__init__(f"non-finite loss, gradient or update at step {step}; {kept}")


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig named by ``c.model`` (preset plus overrides); UsageError naming the
  field if it cannot be built."""
  overrides = c.model.overrides.to_dict() if c.model.get("overrides") else {}
  if "vocab_size" not in overrides:
    overrides["vocab_size"] = data_vocab_size(c)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise UsageError(f"config.model.overrides: unknown ModelConfig fields {unknown}")
  try:
    return get_preset(c.model.preset, **overrides)
  except (ValueError, TypeError) as e:
    raise UsageError(f"config.model: {e}") from None


def data_vocab_size(c: ml_collections.ConfigDict) -> int:
  """:func:`run_config.data_vocab_size`, a UsageError when the data cannot say."""
  try:
    return run_config.data_vocab_size(c)
  except (ValueError, OSError) as e:
    raise UsageError(f"config.data: {e}") from None


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy [B, T] float32 of logits [B, T, V] against targets [B, T]."""
  return cross_entropy(logits, targets)


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
  try:
    need, what = datasets.source(c.data).vocab(c.data)
  except (ValueError, OSError) as e:
    raise UsageError(f"config.data: {e}") from None
  if mcfg.vocab_size < need:
    raise UsageError(f"config.model.overrides.vocab_size must be >= {need} for {what}, got "
                     f"{mcfg.vocab_size}")
  try:
    mesh = sharding.make_mesh(c.mesh.to_dict(), devices)
  except ValueError as e:
    raise UsageError(f"config.mesh: {e}") from None
  try:
    context_lib.check(mcfg, mesh.shape["context"], c.data.seq_len)
  except ValueError as e:
    raise UsageError(f"config.mesh.context={mesh.shape['context']}: {e}") from None
  if mcfg.seq_chunk and c.data.seq_len % (mcfg.seq_chunk * mesh.shape["context"]):
    raise UsageError(f"config.model.overrides.seq_chunk ({mcfg.seq_chunk}) x the mesh's context "
                     f"size ({mesh.shape['context']}) must divide config.data.seq_len "
                     f"({c.data.seq_len})")
  with sharding.activation_rules(mesh):
    abstract_model = nnx.eval_shape(lambda: DecoderLM(mcfg, rngs=nnx.Rngs(0)))
    # Non-trainable state (e.g. a 'fixed' forget gate's constants) is needed as values;
    # XLA drops the unused parameter initialisers from this function.
    rest = jax.jit(lambda: nnx.split(DecoderLM(mcfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[2])()
  graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh))
  pure_params = nnx.to_pure_dict(abstract_params)
  tx = optim.make_optimizer(c.optim)
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
  return Setup(c, mcfg, mesh, graphdef, abstract_params, rest, tx,
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
  """(sum of weighted token losses, sum of weights, kept tiles, total tiles) of a batch
  [B, T]; the weights (``Batch.weights``) are 1 on real targets and 0 on padding for packed
  text, so the sums are the loss and the number of tokens.

  Under context parallelism the batch is permuted into the layout's order here, where it
  enters the model; the sums do not depend on the order.
  """
  model = setup.model(params)
  context = context_lib.active(setup.model_cfg, *batch.inputs.shape)
  if context is not None:
    batch = context.permute_batch(batch)
  # The model's own losses: with model.seq_chunk they never hold the [B, T, V] logits.
  losses, intermediates = nnx.capture(model.token_losses, nnx.Intermediate)(
      batch.inputs, batch.targets, segment_ids=batch.segment_ids, positions=batch.positions)
  weights = batch.weights.astype(jnp.float32)                               # [B, T]
  losses = losses * weights                                                 # [B, T]
  kept, total = _tile_counts(intermediates)
  return jnp.sum(losses), jnp.sum(weights), kept, total


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(setup: Setup) -> Callable:
  """The step as a pure function (state, batch [A, B, T], lr []) -> (state, metrics)."""

  def step(state, batch: Batch, lr):
    params = state["params"]
    count = jnp.maximum(jnp.sum(batch.weights.astype(jnp.float32)), 1.0)

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
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
    new = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
    # A finite loss and gradient can still give a non-finite update (a huge learning rate,
    # an overflowing second moment): the new state itself is checked.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_params)
              & _all_finite(opt_state))
    # A non-finite step changes nothing, so the state in hand is the last good one.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
               "finite": finite, "kept_tiles": kept, "total_tiles": total}
    return new, metrics

  return step


def jit_train_step(setup: Setup) -> Callable:
  """The step jitted with explicit shardings; the input state is donated."""
  batch_sh = Batch(*([setup.batch_sharding()] * len(Batch._fields)))
  replicated = sharding.replicated(setup.mesh)
  jitted = jax.jit(make_train_step(setup),
                   in_shardings=(setup.state_shardings, batch_sh, replicated),
                   out_shardings=(setup.state_shardings, replicated),
                   donate_argnums=(0,))

  def run(state, batch, lr: float):
    with sharding.activation_rules(setup.mesh):
      return jitted(state, batch, np.float32(lr))
  return run


def make_eval_fn(setup: Setup) -> Callable:
  """params, batch [B, T] -> per-token losses times ``batch.weights`` [B, T] (0 on padding),
  jitted."""
  def fn(params, batch: Batch):
    model = setup.model(params)
    context = context_lib.active(setup.model_cfg, *batch.inputs.shape)
    if context is not None:
      batch = context.permute_batch(batch)
    # Captured (and dropped) so a pruning model's tile counts have somewhere to go.
    losses, _ = nnx.capture(model.token_losses, nnx.Intermediate)(
        batch.inputs, batch.targets, segment_ids=batch.segment_ids, positions=batch.positions)
    losses = losses * batch.weights.astype(jnp.float32)
    return losses if context is None else context.unpermute(losses)
  # Replicated output: every process can read all of it, also when the mesh spans hosts.
  jitted = jax.jit(fn, out_shardings=sharding.replicated(setup.mesh))

  def run(params, batch):
    with sharding.activation_rules(setup.mesh):
      return jitted(params, batch)
  return run


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config saved by a run in ``workdir`` (UsageError if there is none)."""
  return rundir.load_config(workdir)


@dataclasses.dataclass
class TrainResult:
  status: str                 # "done" | "preempted"
  step: int
  state: Any
  val_loss: Optional[float]
  signal: Optional[str] = None  # "SIGTERM" | "SIGINT" when preempted


def _note(message: str) -> None:
  if jax.process_index() == 0:
    print(f"fox-train: {message}", file=sys.stderr, flush=True)


def prepare_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A checked copy of ``c`` with absolute paths (UsageError naming the first bad field)."""
  c = ml_collections.ConfigDict(c.to_dict())
  run_config.check_fields(c)
  run_config.resolve_paths(c)
  run_config.validate(c)
  if "vocab_size" not in (c.model.get("overrides") or {}):
    vocab = data_vocab_size(c)   # written into the run's config.json
    if not c.model.get("overrides"):
      c.model.overrides = ml_collections.ConfigDict()
    c.model.overrides.vocab_size = vocab
  return c


def _make_dirs(path: str) -> list[str]:
  """Creates ``path`` and its missing parents; the directories this call created."""
  missing = []
  probe = path
  while not os.path.exists(probe):
    missing.append(probe)
    probe = os.path.dirname(probe)
  created = []
  for d in reversed(missing):
    try:
      os.mkdir(d)
    except FileExistsError:  # another process got there first: not ours to remove
      continue
    except OSError as e:
      raise UsageError(f"cannot create run directory {path}: {e.strerror}") from None
    created.append(d)
  return created


def _unmake_dirs(workdir: str, created: list[str]) -> None:
  """Undoes :func:`_make_dirs` after a failed start: the run directory (ours: we created
  and locked it) with what start-up put in it, then each parent we created if it is still
  empty; a parent another run has started to use since stays."""
  for d in reversed(created):
    if d == workdir:
      shutil.rmtree(d, ignore_errors=True)
    else:
      try:
        os.rmdir(d)
      except OSError:
        pass


@dataclasses.dataclass
class _Start:
  """What start-up hands the training loop."""
  state: Any
  step: int
  position: int
  restored: bool
  checkpointer: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricsWriter


def train(c: ml_collections.ConfigDict, workdir: str, *, max_steps: Optional[int] = None,
          devices=None, signals: Optional[StopSignals] = None) -> TrainResult:
  """Trains (or resumes, if ``workdir`` holds a checkpoint) until the configured tokens.

  ``max_steps`` stops earlier (after a checkpoint), e.g. to split a run. SIGTERM or SIGINT
  saves a checkpoint and returns with status "preempted"; during start-up it raises
  :class:`Interrupted` at the next safe point, leaving nothing half-made (``signals`` lets
  a caller install the handlers earlier, as ``fox-train`` does before importing JAX).
  Raises UsageError, with nothing changed, when the config, the data or the run directory
  cannot be used (another process holds it; it holds a run trained with a config that
  differs in a field outside ``run_config.SAFE_ON_RESUME``; none of its checkpoints
  restores); NonFiniteError after saving the state before a non-finite step;
  CheckpointSaveError when a save fails.
  """
  if signals is None:
    with StopSignals() as own:
      return train(c, workdir, max_steps=max_steps, devices=devices, signals=own)
  c = prepare_config(c)
  if max_steps is not None and max_steps < 0:
    raise UsageError(f"--max_steps must be >= 0, got {max_steps}")
  if not workdir:
    raise UsageError("--workdir must not be empty")
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir {workdir} exists and is not a directory")
  saved = None
  if os.path.isfile(rundir.config_path(workdir)):
    try:
      saved = rundir.load_config(workdir)
    except UsageError:
      pass  # _start reports it
  run_config.resolve_loader(c, saved)
  setup = build(c, devices)
  mesh = setup.mesh
  if c.data.global_batch % (mesh.shape["data"] * mesh.shape["fsdp"] * c.optim.grad_accum):
    raise UsageError(
        f"config.data.global_batch ({c.data.global_batch}) must be a multiple of optim.grad_accum "
        f"({c.optim.grad_accum}) x the mesh's data x fsdp size "
        f"({mesh.shape['data']} x {mesh.shape['fsdp']})")
  signals.check()
  lanes = local_lanes(setup, int(c.data.global_batch), int(c.optim.grad_accum),
                      int(c.data.seq_len))
  train_data, heldout = data_for_run(c, lanes)
  try:
    signals.check()
    lock = rundir.RunLock(workdir) if jax.process_index() == 0 else None
    start = _start(c, setup, workdir, lock, signals, train_data)
    try:
      return _loop(c, setup, workdir, start, train_data, heldout, max_steps, signals)
    finally:
      if lock is not None:
        lock.release()
  finally:
    train_data.close()


def _start(c, setup, workdir: str, lock, signals, loader) -> _Start:
  """Locks ``workdir``, checks it against ``c``, restores or initialises the state and
  writes the run's files. On any failure or signal it undoes what it made."""
  is_main = jax.process_index() == 0
  created = _make_dirs(workdir)
  locked = False
  checkpointer = writer = None
  try:
    if lock is not None:
      lock.acquire()
      locked = True
    checkpointer = ckpt_lib.Checkpointer(workdir, c.run.keep_checkpoints)
    steps = checkpointer.all_steps()
    saved = (rundir.load_config(workdir)
             if os.path.exists(rundir.config_path(workdir)) else None)
    metrics_path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    broken_dir = os.path.join(workdir, ckpt_lib.BROKEN_DIR)
    history = bool(steps) or rundir.last_logged_step(metrics_path) > 0 or (
        os.path.isdir(broken_dir) and bool(os.listdir(broken_dir)))
    config_missing = saved is None
    if saved is None and steps:
      saved = checkpointer.saved_config()
      if saved is None:
        raise UsageError(f"{workdir} holds checkpoints but no {rundir.CONFIG_FILE} and no "
                         f"config in them; put its config.json back to resume it")
    # A run with history keeps its config; a directory without (a start that never got to
    # its first step) may start over with another one.
    changes = run_config.resume_changes(saved, c) if (history and saved is not None) else {}
    restored, broken = (checkpointer.restore_latest(setup.abstract_state)
                        if steps else (None, []))
    if restored is None and history and not steps:
      if os.path.isdir(broken_dir) and os.listdir(broken_dir):
        raise UsageError(f"{workdir} holds no checkpoint that restores (the broken ones are "
                         f"in {broken_dir}); use a new --workdir to start over")
    signals.check()
    if restored is not None:
      for b in broken:  # newer than the one restored
        where = checkpointer.move_aside(b.step) if is_main else b.path
        _note(f"checkpoint step {b.step} cannot be restored ({b.reason}); moved it to {where}")
      state, step = restored.state, restored.step
      position = int(restored.meta["data_position"])
      note = loader.restore(checkpointer.data_state(step), position, c.data.seed)
      if note:
        _note(f"resuming at step {step}: {note}")
    else:
      state, step, position = init_state(setup, c.run.seed), 0, 0
      logged = rundir.last_logged_step(metrics_path)
      if logged:
        _note(f"{workdir} has no checkpoint; starting at step 0 (metrics.jsonl, logged up to "
              f"step {logged}, is cut back)")
    signals.check()
    if is_main:
      if restored is None or config_missing or changes:
        rundir.save_config(c, workdir)
      if changes:
        rundir.record_changes(workdir, step, changes)
        _note(f"resuming at step {step} with changed fields: " + ", ".join(
            f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())
            + ("; the learning-rate schedule continues from the tokens seen"
               if any(k in changes for k in ("optim.total_tokens", "data.global_batch")) else ""))
      # A run killed after its last checkpoint logged steps it is about to repeat.
      rundir.truncate_jsonl(metrics_path, step)
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, first_step=step + 1)
    return _Start(state, step, position, restored is not None, checkpointer, writer)
  except BaseException as e:
    if checkpointer is not None:
      checkpointer.close()
    if lock is not None and locked:
      lock.release()
    if writer is not None:
      writer.close()
    if created and (locked or lock is None):
      _unmake_dirs(workdir, created)
    if isinstance(e, OSError):
      raise UsageError(f"cannot use run directory {workdir}: {e.strerror or e}"
                       + (f" ({e.filename})" if e.filename else "")) from None
    raise


def _loop(c, setup, workdir, start: _Start, train_data, heldout, max_steps,
          signals) -> TrainResult:
  is_main = jax.process_index() == 0
  checkpointer = start.checkpointer
  state, step, position = start.state, start.step, start.position
  first_step = step
  writer = start.writer
  step_fn, eval_fn = setup.train_step, setup.eval_fn
  last_saved = step if start.restored else None
  T, B, micro = int(c.data.seq_len), int(c.data.global_batch), int(c.optim.grad_accum)
  tokens_per_step = run_config.tokens_per_step(c)
  total_tokens = int(c.optim.total_tokens)
  stop_at = step + max(-(-(total_tokens - position * T) // tokens_per_step), 0)
  if max_steps is not None:
    stop_at = min(stop_at, max_steps)
  peak = metrics_lib.peak_flops_per_device(jax.devices()[0], c.run.peak_flops_per_device)

  def save(at_step, at_state, at_position, data_state=None):
    nonlocal last_saved
    if last_saved != at_step:
      checkpointer.save(at_step, at_state, {"step": at_step, "data_position": at_position,
                                            "config": json.loads(run_config.config_to_json(c))},
                        data_state if data_state is not None else train_data.get_state())
      last_saved = at_step

  bar = tqdm(total=max(stop_at, step), initial=step,
             disable=not (is_main and c.run.progress_bar), dynamic_ncols=True, desc="train")
  status, val_loss = "done", None
  window_start, window_steps = time.perf_counter(), 0
  failed = True
  try:
    while step < stop_at:
      if signals.received:
        status = "preempted"
        break
      lr = optim.step_learning_rate(c.optim, position * T, tokens_per_step)
      state, m = step_fn(state, load_batch(setup, train_data, B, micro), lr)
      if not bool(m["finite"]):
        if step > 0:  # the state before a first step is the initialisation: nothing to keep
          save(step, state, position, train_data.state_before_last())
          checkpointer.wait()
        raise NonFiniteError(step + 1, last_saved)
      step += 1
      position += B
      window_steps += 1
      bar.update(1)
      checkpointer.check()
      if step % c.run.log_every == 0 or step == stop_at:
        m = jax.device_get(m)
        elapsed = time.perf_counter() - window_start
        tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
        scalars = {"loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                   "tokens_per_s": tok_s, "tokens": position * T}
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
        save(step, state, position)
    if step > 0:  # a run stopped before its first step has nothing to save
      save(step, state, position)
    checkpointer.wait()
    if status == "done" and position * T >= total_tokens:
      previous = rundir.logged_value(os.path.join(workdir, metrics_lib.METRICS_FILE), step,
                                     "val_loss") if step == first_step else None
      if previous is not None:  # a finished run started again: nothing new to report
        val_loss = previous
      else:
        val_loss = validation_loss(setup, eval_fn, state["params"], heldout, c.run.val_rows,
                                   c.eval.batch_size)
        writer.write(step, {"val_loss": val_loss})
    failed = False
  finally:
    bar.close()
    writer.close()
    if failed:
      try:  # the error in flight says what happened; a second one from closing would hide it
        checkpointer.close()
      except Exception:
        pass
    else:
      checkpointer.close()
  return TrainResult(status, step, state, val_loss, signals.received if status == "preempted" else None)

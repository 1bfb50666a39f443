"""The run configuration: one ml_collections ConfigDict per experiment.

Experiment files under ``experiments/configs/`` start from :func:`base_config` and change
what they need; every field can be overridden on the command line
(``--config.optim.peak_lr=1e-3``). The resolved config is saved in the run directory.

Blocks:
  model  preset name (``fox_jax.config.get_preset``) and ``overrides`` of its fields
  data   source ('builtin' = this interpreter's stdlib, 'text' = files at ``path``),
         held-out fraction, sequence length, global batch (rows per optimizer step), seed
  optim  AdamW and the token-measured schedule; ``grad_accum`` micro-batches per step
  mesh   sizes of (data, fsdp, context, tensor); -1 = the remaining devices
  run    seed, logging / checkpoint / validation cadence, checkpoints kept, peak FLOP/s
  eval   lengths for loss against position (multiples of data.seq_len), documents, smoothing
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.preset = "fox_pro_tiny"
  # Byte vocabulary (259 ids) rounded up to a multiple of 128 so that 'vocab' shards.
  c.model.overrides = ml_collections.ConfigDict(
      {"vocab_size": 384, "dtype": "bfloat16", "param_dtype": "float32", "remat": False,
       "attn_impl": "auto"})

  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin"
  c.data.path = ""
  c.data.heldout_fraction = 0.05
  c.data.seq_len = 256
  c.data.global_batch = 16
  c.data.seed = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.peak_lr = 2e-3
  c.optim.warmup_tokens = 100_000
  c.optim.total_tokens = 1_000_000
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0
  c.optim.grad_accum = 1

  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "context": 1, "tensor": 1})

  c.run = ml_collections.ConfigDict()
  c.run.seed = 0
  c.run.log_every = 10
  c.run.checkpoint_every = 200
  c.run.keep_checkpoints = 3
  c.run.eval_every = 0
  c.run.val_rows = 64
  c.run.peak_flops_per_device = 0.0
  c.run.progress_bar = True

  c.eval = ml_collections.ConfigDict()
  c.eval.length_multiples = (1, 4)
  c.eval.max_docs = 64
  c.eval.batch_size = 8
  c.eval.smooth = 21
  return c


def tokens_per_step(c: ml_collections.ConfigDict) -> int:
  return int(c.data.global_batch) * int(c.data.seq_len)


def total_steps(c: ml_collections.ConfigDict) -> int:
  """Optimizer steps covering ``optim.total_tokens`` (rounded up)."""
  return -(-int(c.optim.total_tokens) // tokens_per_step(c))


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError on inconsistent sizes before any device work starts."""
  if c.data.global_batch % c.optim.grad_accum:
    raise ValueError(f"data.global_batch ({c.data.global_batch}) must be a multiple of "
                     f"optim.grad_accum ({c.optim.grad_accum})")
  if c.data.seq_len < 1 or c.data.global_batch < 1:
    raise ValueError("data.seq_len and data.global_batch must be positive")
  if any(m < 1 for m in c.eval.length_multiples):
    raise ValueError(f"eval.length_multiples must be >= 1, got {c.eval.length_multiples}")


def cpu_demo_config(preset: str) -> ml_collections.ConfigDict:
  """The README main command's recipe: a small model trained for ~2 minutes on 2 CPU cores.

  4 layers, d_model 128, 4 heads x 32, byte-level, 256-token rows of the built-in corpus,
  16 rows per step, 800k tokens (196 steps), peak learning rate 3e-3 after 80k tokens.
  FoX and Transformer runs differ only in ``preset``.
  """
  c = base_config()
  c.model.preset = preset
  c.model.overrides.update({"num_layers": 4, "d_model": 128, "num_heads": 4})
  c.data.seq_len = 256
  c.data.global_batch = 16
  c.optim.peak_lr = 3e-3
  c.optim.warmup_tokens = 80_000
  c.optim.total_tokens = 800_000
  c.run.checkpoint_every = 100
  c.eval.length_multiples = (1, 4)
  return c

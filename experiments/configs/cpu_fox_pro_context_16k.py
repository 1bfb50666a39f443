"""FoX (Pro) trained at 16k tokens with context parallelism on 8 simulated CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      fox-train --config experiments/configs/cpu_fox_pro_context_16k.py --workdir runs/context/fox_pro_16k

Each 16,384-token row is laid out zigzag over the mesh's 8 'context' devices (2 of 16
chunks of 1,024 tokens each); attention runs as a ring over them with ACP skipping the
pruned tiles, the key/value shift takes its one-token halos from the neighbouring chunks,
and the LM head and MLP run in 512-token chunks of each shard. 2 layers, d_model 128,
4 heads x 32, byte-level, 2 rows per step, 16 steps, float32 (the CPU's fast path).
The same run without context parallelism: --config.mesh.context=1 --config.mesh.data=1
(on one device: XLA_FLAGS unset). Figures: README, "Context parallelism".
"""

from fox_jax.run_config import cpu_demo_config


def get_config():
  c = cpu_demo_config("fox_pro_tiny")
  c.model.overrides.update({
      "num_layers": 2, "d_model": 128, "num_heads": 4, "dtype": "float32",
      "context_strategy": "zigzag", "seq_chunk": 512,
      "pruning": {"log_tolerance": -10.0, "qk_bound": "auto"},
      "block_sizes": {"block_q": 128, "block_k": 128}})
  c.data.seq_len = 16384
  c.data.global_batch = 2
  c.optim.peak_lr = 3e-3
  c.optim.warmup_tokens = 4 * 2 * 16384
  c.optim.total_tokens = 16 * 2 * 16384
  c.mesh.update({"data": 1, "fsdp": 1, "context": 8, "tensor": 1})
  c.run.log_every = 1
  c.run.checkpoint_every = 8
  c.run.val_rows = 2
  c.eval.length_multiples = (1,)
  c.eval.batch_size = 1
  c.eval.max_docs = 8
  return c

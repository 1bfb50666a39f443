"""Transformer (Pro) 125M (12 layers, d_model 768, 12 heads x 64, RoPE) with the paper's
recipe, for an accelerator host or pod; a byte vocabulary on the built-in corpus or your own text.

  fox-train --config experiments/configs/transformer_pro_125m.py --workdir runs/transformer_pro_125m \
      --config.data.source=text --config.data.path='/data/corpus/**/*.txt'

FSDP over every device (mesh fsdp = -1); 2048-token rows, 256 rows (0.5M tokens) per
step; AdamW 2e-3, warmup 256M tokens (capped to the run), cosine to zero over 2.5G
tokens; bf16 compute, f32 parameters; blocks rematerialised. Not run here.
"""

from fox_jax.run_config import base_config


def get_config():
  c = base_config()
  c.model.preset = "transformer_pro_125m"
  c.model.overrides.update({"remat": True})
  c.data.seq_len = 2048
  c.data.global_batch = 256
  c.optim.peak_lr = 2e-3
  c.optim.warmup_tokens = 256 * 2**20
  c.optim.total_tokens = int(2.5 * 2**30)
  c.mesh.update({"data": 1, "fsdp": -1, "context": 1, "tensor": 1})
  c.run.log_every = 50
  c.run.checkpoint_every = 1000
  c.run.eval_every = 1000
  c.eval.length_multiples = (1, 4)
  c.eval.batch_size = 16
  return c

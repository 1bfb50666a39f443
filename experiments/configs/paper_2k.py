"""The paper's recipe at 2048 tokens for an accelerator host or pod; a byte vocabulary on
the built-in corpus or your own text. The argument is a 125M preset: fox_pro_125m,
transformer_pro_125m, fox_llama_125m or transformer_llama_125m (the token budget and
learning rate below are the paper's for 125M).

  fox-train --config experiments/configs/paper_2k.py:fox_pro_125m --workdir runs/fox_pro_125m \
      --config.data.source=text --config.data.path='/data/corpus/**/*.txt'

FSDP over every device (mesh fsdp = -1); 2048-token rows, 256 rows (0.5M tokens) per
step; AdamW 2e-3, warmup 256M tokens (capped to the run), cosine to zero over 2.5G
tokens; bf16 compute, f32 parameters; blocks rematerialised. Not run here.
"""

from fox_jax.config import PRESETS
from fox_jax.run_config import base_config, config_arg


def get_config(preset: str = "fox_pro_125m"):
  """preset: fox_pro_125m | transformer_pro_125m | fox_llama_125m | transformer_llama_125m"""
  c = base_config()
  c.model.preset = config_arg(preset, tuple(p for p in PRESETS if p.endswith("_125m")))
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

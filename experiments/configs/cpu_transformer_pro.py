"""Transformer (Pro), small, on the built-in corpus: the baseline of the README's main command.

  fox-train --config experiments/configs/cpu_transformer_pro.py --workdir runs/main/transformer_pro

Same sizes, data and schedule as ``cpu_fox_pro.py``; the block has RoPE instead of the
forget gate (REFERENCE.md section 3). Result here (``scripts/main.sh``, 2-core CPU,
2026-11-29): validation loss 2.1534 nats/byte; held-out loss at positions 1-32 / 225-256 /
769-1024: 2.872 / 2.560 / 2.690, rising past the training length where FoX's keeps falling
(``cpu_fox_pro.py``).
"""

from fox_jax.run_config import cpu_demo_config


def get_config():
  return cpu_demo_config("transformer_pro_tiny")

"""FoX (Pro), small, on the built-in corpus: the FoX half of the README's main command.

  fox-train --config experiments/configs/cpu_fox_pro.py --workdir runs/main/fox_pro

Sizes and schedule: ``fox_jax.run_config.cpu_demo_config``. Result here (``scripts/main.sh``,
2-core CPU, 196 steps, about 3 minutes, 2026-11-29): validation loss 1.9155 nats/byte;
held-out loss at positions 1-32 / 225-256 / 769-1024 (3x past the training length):
2.518 / 2.240 / 1.994 (``cpu_transformer_pro.py``: 2.1534; 2.872 / 2.560 / 2.690).
"""

from fox_jax.run_config import cpu_demo_config


def get_config():
  return cpu_demo_config("fox_pro_tiny")

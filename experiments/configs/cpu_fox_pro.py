"""FoX (Pro), small, on the built-in corpus: the FoX half of the README's main command.

  fox-train --config experiments/configs/cpu_fox_pro.py --workdir runs/main/fox_pro

Sizes and schedule: ``fox_jax.run_config.cpu_demo_config``. Its result from
``scripts/main.sh`` is in the README, next to ``cpu_transformer_pro.py``.
"""

from fox_jax.run_config import cpu_demo_config


def get_config():
  return cpu_demo_config("fox_pro_tiny")

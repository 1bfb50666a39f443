"""The README's main command: a small model on the built-in corpus, one run per family.

  fox-train --config experiments/configs/cpu_demo.py:fox_pro --workdir runs/main/fox_pro
  fox-train --config experiments/configs/cpu_demo.py:transformer_pro --workdir runs/main/transformer_pro

The argument is the family (fox_pro, transformer_pro, fox_llama, transformer_llama); sizes,
data and schedule are the same for all (``fox_jax.run_config.cpu_demo_config``). Results
here (``scripts/main.sh``, 2-core CPU, 196 steps, grain loader, commit dc1d9e9, 2026-11-29),
validation loss in nats per byte and held-out loss at positions 1-32 / 225-256 / 769-1024
(3x past the training length):

  fox_pro           2.0868   2.449 / 2.207 / 2.004
  transformer_pro   2.3549   2.852 / 2.581 / 2.740   (rising past the training length, where
                                                      FoX's keeps falling)
"""

from fox_jax.run_config import config_arg, cpu_demo_config

FAMILIES = ("fox_pro", "transformer_pro", "fox_llama", "transformer_llama")


def get_config(family: str = "fox_pro"):
  """family: fox_pro | transformer_pro | fox_llama | transformer_llama"""
  return cpu_demo_config(f"{config_arg(family, FAMILIES)}_tiny")

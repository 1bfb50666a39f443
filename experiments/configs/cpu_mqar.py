"""Multi-query associative recall on a CPU: a tiny 2-layer model trained on MQAR.

  fox-train --config experiments/configs/cpu_mqar.py:fox_pro --workdir runs/mqar/fox_pro
  fox-eval runs/mqar/fox_pro --task mqar

The argument is the family (fox_pro, transformer_pro, fox_llama, transformer_llama); the
task, sizes and schedule are the same for all (``fox_jax.run_config.cpu_mqar_config``).
``--config.data.mqar_variant=last_value`` trains the last-value-wins variant.
"""

from fox_jax.run_config import config_arg, cpu_mqar_config

FAMILIES = ("fox_pro", "transformer_pro", "fox_llama", "transformer_llama")


def get_config(family: str = "fox_pro"):
  """family: fox_pro | transformer_pro | fox_llama | transformer_llama"""
  return cpu_mqar_config(f"{config_arg(family, FAMILIES)}_tiny")

"""The paper's recipe at 16k tokens with context parallelism, for an 8-GPU host or a TPU
slice: the sequence split over 8 devices (zigzag), FSDP over the rest. The argument is a
paper-size preset (fox_pro_125m, fox_pro_360m, fox_pro_760m, or another family's).

  fox-train --config experiments/configs/paper_16k_context.py:fox_pro_360m --workdir runs/fox_pro_360m_16k \
      --config.data.source=text --config.data.path='/data/corpus/**/*.txt'

Recipe and mesh: ``fox_jax.run_config.paper_context_config``. Set --config.mesh.context to
the devices that share fast links (8 GPUs of a host; 4-16 chips of a TPU slice); with
fewer than 8 devices in all, lower it. Not run here (no accelerator).
"""

from fox_jax.run_config import paper_context_config


def get_config(preset: str = "fox_pro_360m"):
  """preset: fox_pro_125m | fox_pro_360m | fox_pro_760m (or another family at those sizes)"""
  return paper_context_config(preset, context=8)

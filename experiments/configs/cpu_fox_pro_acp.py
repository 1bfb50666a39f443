"""FoX (Pro) with Adaptive Computation Pruning, as ``cpu_demo.py:fox_pro`` otherwise.

  fox-train --config experiments/configs/cpu_fox_pro_acp.py --workdir runs/acp/fox_pro_acp

Logs ``kept_tile_fraction`` (kept / total attention tiles over all layers) with the loss.
ACP's threshold is log(eps) - 2U - log(N) with log eps = -10 and U bounded from the
q and k norms per batch and head ('auto'); pruned tiles provably carry at most eps of
each query's attention weight.
"""

from fox_jax.run_config import cpu_demo_config


def get_config():
  c = cpu_demo_config("fox_pro_tiny")
  c.model.overrides.pruning = {"log_tolerance": -10.0, "qk_bound": "auto"}
  c.model.overrides.block_sizes = {"block_q": 64, "block_k": 64}
  return c

"""Joining several processes into one JAX system (multi-host training).

Every process of a multi-host run calls :func:`initialize` first, before anything asks
for devices; afterwards ``jax.devices()`` lists the devices of all processes, a mesh spans
them, and each process feeds only the batch rows its own devices hold
(``fox_jax.train.load_batch``). Process 0 alone writes metrics, TensorBoard files, the
saved config and the progress bar; orbax checkpoints are written by all processes
together, each saving the shards it holds, so the run directory must be on a file system
every process sees.
"""

from __future__ import annotations

from typing import Optional

import jax


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Joins this process to the run's other processes.

  With no arguments JAX detects them itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes
  jobs); a hand-launched run names the coordinator ``host:port`` (process 0's address),
  the number of processes and this process's id (0 .. num_processes - 1).
  """
  # Collectives between CPU processes go over TCP with gloo; accelerators bring their own
  # (NCCL, ICI), and this setting only concerns the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def is_main() -> bool:
  """True in the process that writes run files meant to exist once (metrics, reports)."""
  return jax.process_index() == 0

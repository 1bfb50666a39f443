"""Context parallelism in training: per-device memory of the compiled train step against S.

Usage (recorded runs: the README, "Context parallelism"):

    PYTHONPATH=. python benchmarks/context_parallel.py            # 8 simulated CPU devices
    PYTHONPATH=. python benchmarks/context_parallel.py --lengths 4096,16384 --no-chunk
    # on a host with 8 GPUs or a TPU slice, a paper-size model:
    PYTHONPATH=. python benchmarks/context_parallel.py --real-devices \\
        --config experiments/configs/paper_16k_context.py:fox_pro_360m --batch 8 \\
        --lengths 16384,32768,65536,131072

For each sequence length S, the train step of the config's model (default: the 16k CPU
example, ``experiments/configs/cpu_fox_pro_context_16k.py``) is compiled, not run, once on
one device (mesh context 1) and once with the sequence over the config's context devices,
and the compiled program's ``memory_analysis`` gives, per device:

  args    parameters, optimizer state and batch held on the device
  temp    everything else the step needs at its peak (activations, gradients, buffers)
  total   args + temp + outputs not aliased to donated inputs

"fits 24 GiB": whether the sum over the host's devices fits a 24 GiB host (this machine).
Simulated devices share the host, so context parallelism on one CPU host divides memory
per device, not the host's total; on a real mesh each device has its own memory, and the
per-device column is what has to fit. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

if "--real-devices" not in sys.argv:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fox_jax import run_config, sharding  # noqa: E402
from fox_jax import train as train_lib  # noqa: E402
from fox_jax.data import Batch  # noqa: E402

HOST_BYTES = 24 * 2**30
DEFAULT_CONFIG = "experiments/configs/cpu_fox_pro_context_16k.py"


def compiled_memory(c, devices) -> dict:
  """Per-device bytes of the compiled train step of config ``c`` on ``devices``."""
  setup = train_lib.build(c, devices)
  B, T = c.data.global_batch, c.data.seq_len
  sh = setup.batch_sharding()
  batch = Batch(*(jax.ShapeDtypeStruct((1, B, T), np.float32 if f == "weights" else np.int32,
                                       sharding=sh) for f in Batch._fields))
  step = jax.jit(train_lib.make_train_step(setup),
                 in_shardings=(setup.state_shardings, Batch(*([sh] * len(Batch._fields))),
                               sharding.replicated(setup.mesh)),
                 out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=(0,))
  with sharding.activation_rules(setup.mesh):
    compiled = step.lower(setup.abstract_state, batch,
                          jax.ShapeDtypeStruct((), np.float32)).compile()
  m = compiled.memory_analysis()
  args, temp = m.argument_size_in_bytes, m.temp_size_in_bytes
  out = m.output_size_in_bytes - m.alias_size_in_bytes
  return {"args": args, "temp": temp, "total": args + temp + max(out, 0)}


def mib(x: float) -> str:
  return f"{x / 2**20:,.0f}"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=DEFAULT_CONFIG)
  p.add_argument("--lengths", default="4096,8192,16384,32768,65536")
  p.add_argument("--batch", type=int, default=None, help="rows per step (default: the config's)")
  p.add_argument("--no-chunk", action="store_true", help="also without seq_chunk")
  p.add_argument("--real-devices", action="store_true")
  a = p.parse_args(argv)

  base = run_config.load_config_file(a.config)
  P = int(base.mesh.context)
  devices = jax.devices()
  print(f"# Context parallelism: compiled train-step memory per device "
        f"({datetime.date.today()}, {devices[0].device_kind} x {len(devices)}, "
        f"jax {jax.__version__})")
  print(f"# command: python benchmarks/context_parallel.py {' '.join(sys.argv[1:])}")
  print(f"# config: {a.config}; sizes in MiB per device; 'fits': the sum over the host's "
        f"devices <= 24 GiB")
  chunks = [base.model.overrides.get("seq_chunk")] + ([None] if a.no_chunk else [])
  print()
  print("| S | seq_chunk | 1 device: args | temp | total | fits | "
        f"context {P}: args | temp | total | fits | temp ratio |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for S in (int(x) for x in a.lengths.split(",")):
    for chunk in chunks:
      row = []
      for ctx, devs in ((1, devices[:1]), (P, devices[:P])):
        c = type(base)(base.to_dict())
        c.data.seq_len = S
        if a.batch is not None:
          c.data.global_batch = a.batch
        c.model.overrides.seq_chunk = chunk
        c.mesh.update({"data": 1, "fsdp": 1, "context": ctx, "tensor": 1})
        row.append(compiled_memory(c, devs))
      one, cp = row
      fits = lambda m, n: "yes" if m["total"] * n <= HOST_BYTES else "no"
      print(f"| {S} | {chunk} | {mib(one['args'])} | {mib(one['temp'])} | {mib(one['total'])} "
            f"| {fits(one, 1)} | {mib(cp['args'])} | {mib(cp['temp'])} | {mib(cp['total'])} "
            f"| {fits(cp, P)} | {one['temp'] / cp['temp']:.2f} |", flush=True)


if __name__ == "__main__":
  main()

"""Multi-host training: two processes joined by jax.distributed equal one 8-device process.

Two ``fox-train --coordinator ...`` processes with 4 CPU devices each form one 8-device
system (gloo collectives over localhost) and train on a (data 2, fsdp 2, tensor 2) mesh
that spans both, each loading only its own batch rows (the documents of its grain lanes). Their losses, validation loss and
checkpointed parameters must equal the same config trained here in one process on 8
devices; only process 0 writes metrics and prints.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from fox_jax import checkpoint as ckpt_lib
from fox_jax import train as train_lib
from fox_jax.metrics import read_jsonl
from tests.tolerances import assert_close

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
# Import, compile and 3 steps take ~15 s per process on a 2-core CPU; this bounds a hang
# (a process waiting for a peer that died) rather than a slow machine.
TIMEOUT_S = 240

STEPS = 3
OVERRIDES = [
    "--config.model.overrides.num_layers=1", "--config.model.overrides.d_model=64",
    "--config.model.overrides.dtype=float32", "--config.model.overrides.attn_impl=reference",
    "--config.data.seq_len=32", "--config.data.global_batch=8",
    "--config.optim.warmup_tokens=256", f"--config.optim.total_tokens={STEPS * 32 * 8}",
    "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.context=1",
    "--config.mesh.tensor=2", "--config.run.log_every=1", "--config.run.val_rows=8",
    "--config.run.checkpoint_every=100000", "--config.run.progress_bar=False",
]
MAIN = "import sys; from fox_jax.cli import train_main; sys.exit(train_main())"


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(workdir: str) -> list[tuple[int, str, str]]:
  """Runs the processes of one job; (return code, stdout, stderr) of each, in id order.

  If one fails or the job hangs, the others are killed, so that no process is left waiting
  for a peer.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
  address = f"127.0.0.1:{free_port()}"
  config = os.path.join(REPO, "experiments/configs/cpu_demo.py:fox_pro")
  procs = []
  for i in range(NUM_PROCESSES):
    args = ["--config", config, "--workdir", workdir, "--coordinator", address,
            "--num_processes", str(NUM_PROCESSES), "--process_id", str(i)] + OVERRIDES
    procs.append(subprocess.Popen([sys.executable, "-c", MAIN] + args, env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  deadline = time.time() + TIMEOUT_S
  try:
    while time.time() < deadline:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for p in procs:
    out, err = p.communicate()
    results.append((p.returncode, out, err))
  return results


def describe(results) -> str:
  return "\n".join(f"--- process {i}: exit {code}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
                   for i, (code, out, err) in enumerate(results))


@pytest.mark.slow
def test_two_processes_equal_one_process_on_eight_devices(tmp_path):
  if jax.device_count() != NUM_PROCESSES * DEVICES_PER_PROCESS:
    pytest.skip("the one-process baseline needs 8 devices (tests/conftest.py sets them)")
  multi_dir = str(tmp_path / "two_processes")
  results = run_processes(multi_dir)
  assert all(code == 0 for code, _, _ in results), describe(results)
  # Process 0 alone reports, logs metrics and writes TensorBoard files.
  assert "fox-train: finished at step 3; validation loss" in results[0][1], describe(results)
  assert "fox-train:" not in results[1][1], describe(results)
  assert len(os.listdir(os.path.join(multi_dir, "tensorboard"))) == 1

  # The same resolved config (saved by process 0) in this process, on its 8 devices.
  c = train_lib.load_config(multi_dir)
  single = train_lib.train(c, str(tmp_path / "one_process"), devices=jax.devices())
  assert single.step == STEPS

  multi_metrics = read_jsonl(os.path.join(multi_dir, "metrics.jsonl"))
  single_metrics = read_jsonl(os.path.join(tmp_path / "one_process", "metrics.jsonl"))
  for key in ("loss", "grad_norm"):
    got = [m[key] for m in multi_metrics if key in m]
    want = [m[key] for m in single_metrics if key in m]
    assert len(got) == len(want) == STEPS, (key, got, want)
    assert_close(got, want, jnp.float32, key)
  [val] = [m["val_loss"] for m in multi_metrics if "val_loss" in m]
  assert_close(val, single.val_loss, jnp.float32, "val_loss")

  # The checkpoint both processes wrote together restores here, onto one process's mesh.
  setup = train_lib.build(c, jax.devices())
  checkpointer = ckpt_lib.Checkpointer(multi_dir, c.run.keep_checkpoints)
  assert checkpointer.all_steps() == [STEPS]
  state, meta = checkpointer.restore(STEPS, setup.abstract_state)
  checkpointer.close()
  assert int(state["step"]) == STEPS and meta["data_position"] == STEPS * c.data.global_batch
  got, want = jax.device_get(state["params"]), jax.device_get(single.state["params"])
  paths = jax.tree_util.tree_flatten_with_path(want)[0]
  for (path, a), b in zip(paths, jax.tree.leaves(got)):
    assert_close(b, a, jnp.float32, jax.tree_util.keystr(path))

  # Each process read only the rows (grain lanes) its devices hold, and each lane is where
  # the one-process run's same lane is: the global batches were the same.
  data_dir = os.path.join(checkpointer.step_dir(STEPS), "data")
  states = [json.load(open(os.path.join(data_dir, f"process_{i}-of-{NUM_PROCESSES}.json")))
            for i in range(NUM_PROCESSES)]
  assert sorted(sum((s["lanes"] for s in states), [])) == list(range(c.data.global_batch))
  assert all(len(s["lanes"]) == c.data.global_batch // NUM_PROCESSES for s in states)
  one = json.load(open(os.path.join(tmp_path, "one_process", "checkpoints", str(STEPS), "data",
                                    "process_0-of-1.json")))
  assert one["lanes"] == list(range(c.data.global_batch))
  for s in states:
    assert s["grain"]["parents"] == [one["grain"]["parents"][j] for j in s["lanes"]]

"""Training metrics: JSON lines, TensorBoard event files and a model-FLOPs estimate.

TensorBoard files are written with the ``tensorboard`` package alone (no TensorFlow):
scalar summaries in an event file under ``<run>/tensorboard``. Each session of a run starts
its event file with a SessionLog START at its first step, so TensorBoard drops the events
that an earlier session logged after the checkpoint this one resumed from (the same
steps are cut from ``metrics.jsonl`` by ``rundir.truncate_jsonl``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping, Optional

import jax
from tensorboard.compat.proto import event_pb2

from fox_jax.errors import RunError

METRICS_FILE = "metrics.jsonl"
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

# Dense bf16 peak FLOP/s per device, by a substring of jax's ``device_kind``. Used only for
# the MFU estimate; a device not listed gets no MFU unless the config gives its peak.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device: jax.Device, override: float = 0.0) -> Optional[float]:
  if override > 0:
    return float(override)
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def flops_per_token(num_matmul_params: int, num_layers: int, num_heads: int, head_dim: int,
                    seq_len: int) -> float:
  """Training FLOPs per token: 6 N for the matmuls plus causal attention.

  Attention per layer and token: 4 T H D forward for QK^T and PV over T keys, halved by
  causality, times 3 for forward and backward (the backward costs twice the forward).
  """
  return 6.0 * num_matmul_params + 6.0 * num_layers * num_heads * head_dim * seq_len


class MetricsWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl`` and TensorBoard.

  A failed write (a full disk) raises RunError naming the file.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, first_step: int = 1):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(self.path, "a", buffering=1)
      self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(first_step),
                                         session_log=start))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items() if v is not None}
    try:
      self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
    except OSError as e:
      raise RunError(f"writing {self.path} failed ({e.strerror}); checkpoints saved so far "
                     f"are kept") from e
    wall = time.time()
    for tag, value in clean.items():
      event = event_pb2.Event(wall_time=wall, step=int(step), summary=scalar_pb(tag, value))
      self._tb.add_event(event)

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.enabled = False
      try:
        self._jsonl.close()
      except OSError:  # a failed write was reported when it happened
        pass
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]

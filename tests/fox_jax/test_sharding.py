"""Mesh construction, logical-axis rules, and the sharded training step against one device."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fox_jax import run_config, sharding
from fox_jax import train as train_lib
from fox_jax.data import PackedDataset, corpus_from_config
from tests.tolerances import assert_close

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("axes,expected", [
    ({"data": -1}, (8, 1, 1, 1)),
    ({"data": 2, "fsdp": -1}, (2, 4, 1, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 1, 2)),
    ({"fsdp": 2, "context": 2, "tensor": -1}, (1, 2, 2, 2)),
])
def test_mesh_shape_resolves_minus_one(axes, expected):
  assert sharding.mesh_shape(axes, 8) == expected


@pytest.mark.parametrize("axes,match", [
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3, "fsdp": -1}, "do not divide"),
    ({"data": 2, "fsdp": 2}, "needs 4 devices"),
    ({"pipeline": 2}, "unknown mesh axes"),
])
def test_mesh_shape_errors(axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(axes, 8)


def test_logical_rules_drop_axes_that_do_not_divide():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_to_mesh_spec(("embed", "mlp"), (64, 256), mesh) == P("fsdp", "tensor")
  # 3 kv heads cannot be split over tensor=2: that axis is replicated instead.
  assert sharding.logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), (64, 3, 16), mesh) == \
      P("fsdp", None, None)
  assert sharding.logical_to_mesh_spec(("act_batch", "act_length"), (4, 32), mesh) == \
      P(("data", "fsdp"), "context")
  assert sharding.logical_to_mesh_spec(("act_batch",), (2,), mesh) == P("data")


def _config(mesh, impl):
  c = run_config.base_config()
  c.model.overrides.update({"num_layers": 1, "dtype": "float32", "attn_impl": impl})
  c.data.seq_len = 32
  c.data.global_batch = 8
  c.optim.warmup_tokens = 256
  c.optim.total_tokens = 4096
  c.mesh.update(mesh)
  return c


@pytest.mark.parametrize("impl", ["reference", pytest.param("xla", marks=pytest.mark.slow)])
def test_sharded_step_matches_one_device(impl):
  """One step on a (data 2, fsdp 2, tensor 2) mesh == the same step on one device."""
  c8 = _config({"data": 2, "fsdp": 2, "context": 1, "tensor": 2}, impl)
  c1 = _config({"data": 1, "fsdp": 1, "context": 1, "tensor": 1}, impl)
  s8 = train_lib.build(c8, jax.devices())
  s1 = train_lib.build(c1, jax.devices()[:1])
  host_state = jax.device_get(train_lib.init_state(s8, seed=0))
  data = PackedDataset(corpus_from_config(c1.data, "train"), 32, 0)
  results = []
  for setup in (s8, s1):
    state = jax.device_put(host_state, setup.state_shardings)
    state, metrics = setup.train_step(state, train_lib.load_batch(setup, train_lib.rows_loader(setup, data, 0, 8, 1), 8, 1), 1e-3)
    results.append((state, jax.device_get(metrics)))
  (state8, m8), (state1, m1) = results
  kernel = state8["params"]["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (32, 128)
  assert_close(m8["loss"], m1["loss"], jnp.float32, "loss")
  assert_close(m8["grad_norm"], m1["grad_norm"], jnp.float32, "grad_norm")
  p8, p1 = jax.device_get(state8["params"]), jax.device_get(state1["params"])
  paths = jax.tree_util.tree_flatten_with_path(p1)[0]
  for (path, a), b in zip(paths, jax.tree.leaves(p8)):
    assert_close(b, a, jnp.float32, jax.tree_util.keystr(path))
  # The update moved the parameters: the comparison is not of two copies of the init.
  assert not np.allclose(jax.tree.leaves(p1)[0], jax.tree.leaves(host_state["params"])[0])


_COMPILE_STEP = """
import jax, jax.numpy as jnp
from fox_jax import run_config, sharding, train
from fox_jax.data import Batch
c = run_config.base_config()
c.model.overrides.update({"num_layers": 1, "dtype": "float32", "attn_impl": "reference"})
c.data.seq_len, c.data.global_batch = 32, 8
c.mesh.update({"data": 2, "fsdp": 2, "context": 1, "tensor": 2})
s = train.build(c, jax.devices())
rows = jax.ShapeDtypeStruct((1, 8, 32), jnp.int32, sharding=s.batch_sharding())
rep = sharding.replicated(s.mesh)
step = jax.jit(train.make_train_step(s), in_shardings=(s.state_shardings, Batch(*[s.batch_sharding()] * 5), rep),
               out_shardings=(s.state_shardings, rep))
with sharding.activation_rules(s.mesh):
  step.lower(s.abstract_state, Batch(*[rows] * 4, rows.update(dtype=jnp.float32)), jax.ShapeDtypeStruct((), jnp.float32)).compile()
print("compiled")
"""


def test_sharded_step_compiles_without_involuntary_rematerialization():
  """The embedding lookup from a table sharded over fsdp and tensor into batch-split
  activations (and its gradient back) compiles without XLA's "Involuntary full
  rematerialization": an all-gather of the array to every device. XLA logs it from C++,
  so the step is compiled in a subprocess whose stderr is read."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _COMPILE_STEP], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
  assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]

"""Training loop: exact resume, SIGTERM, non-finite stops, accumulation, optimizer recipe."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fox_jax import checkpoint as ckpt_lib
from fox_jax import optim, run_config
from fox_jax import train as train_lib
from fox_jax.data import PackedDataset, corpus_from_config
from tests.tolerances import FLOAT64_RTOL, assert_close

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(steps=4, seq_len=32, batch=4, **model):
  """A 1-layer FoX (Pro) on the built-in corpus; the reference attention compiles fastest."""
  c = run_config.base_config()
  c.model.overrides.update({"num_layers": 1, "dtype": "float32", "attn_impl": "reference",
                            **model})
  c.data.seq_len = seq_len
  c.data.global_batch = batch
  c.optim.warmup_tokens = 2 * seq_len * batch
  c.optim.total_tokens = steps * seq_len * batch
  c.mesh.update({"data": 1, "fsdp": -1})
  c.run.log_every = 1
  c.run.val_rows = 4
  c.run.progress_bar = False
  return c


def one_device():
  return jax.devices()[:1]


def test_resume_is_bitwise_identical_and_keeps_last_k(tmp_path):
  c = tiny_config(steps=4)
  straight = train_lib.train(c, str(tmp_path / "straight"), devices=one_device())
  split_dir = str(tmp_path / "split")
  c.run.checkpoint_every = 1
  c.run.keep_checkpoints = 2
  first = train_lib.train(c, split_dir, max_steps=2, devices=one_device())
  assert first.step == 2 and first.val_loss is None
  second = train_lib.train(c, split_dir, devices=one_device())
  assert straight.step == second.step == 4
  a, b = jax.device_get(straight.state), jax.device_get(second.state)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert straight.val_loss == second.val_loss
  # The second run logged steps 3 and 4 only: it resumed, it did not restart.
  lines = [json.loads(l) for l in open(os.path.join(split_dir, "metrics.jsonl"))]
  assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4]
  assert ckpt_lib.Checkpointer(split_dir, 2).all_steps() == [3, 4]


def test_non_finite_stops_with_step_and_keeps_last_good(tmp_path):
  c = tiny_config(steps=8)
  # An absurd learning rate: the first update is finite, then activations overflow.
  c.optim.peak_lr = 1e30
  c.optim.warmup_tokens = 0
  c.run.checkpoint_every = 1
  with pytest.raises(train_lib.NonFiniteError, match=r"at step \d+") as err:
    train_lib.train(c, str(tmp_path), devices=one_device())
  bad, good = err.value.step, err.value.last_good
  assert bad >= 2 and good == bad - 1
  setup = train_lib.build(c, one_device())
  ck = ckpt_lib.Checkpointer(str(tmp_path), 3)
  assert ck.latest_step() == good
  state, meta = ck.restore(good, setup.abstract_state)
  assert int(state["step"]) == good and meta["data_position"] == good * c.data.global_batch
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=REPO)
  args = ["--config", os.path.join(REPO, "experiments/configs/cpu_demo.py:fox_pro"),
          "--workdir", workdir, "--config.data.seq_len=32", "--config.data.global_batch=4",
          "--config.model.overrides.num_layers=1", "--config.model.overrides.d_model=64",
          "--config.model.overrides.attn_impl=reference", "--config.run.log_every=1",
          "--config.run.checkpoint_every=100000", "--config.run.progress_bar=False"]
  code = "import sys; from fox_jax.cli import train_main; sys.exit(train_main())"
  proc = subprocess.Popen([sys.executable, "-c", code] + args, env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGTERM)
  out, errs = proc.communicate(timeout=120)
  assert proc.returncode == 0, errs
  assert "stopped by SIGTERM at step" in out
  step = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert step >= 2
  assert ckpt_lib.Checkpointer(workdir, 3).latest_step() == step


def test_grad_accumulation_matches_one_big_batch():
  c1 = tiny_config(steps=2, batch=4)
  c2 = tiny_config(steps=2, batch=4)
  c2.optim.grad_accum = 2
  s1, s2 = train_lib.build(c1, one_device()), train_lib.build(c2, one_device())
  data = PackedDataset(corpus_from_config(c1.data, "train"), c1.data.seq_len, 0)
  out = []
  for setup, micro in ((s1, 1), (s2, 2)):
    state = train_lib.init_state(setup, 0)
    state, m = setup.train_step(state, train_lib.load_batch(setup, train_lib.rows_loader(setup, data, 0, 4, micro), 4, micro), 1e-3)
    out.append((jax.device_get(state["params"]), float(m["loss"])))
  assert_close(out[1][1], out[0][1], jnp.float32, "loss")
  for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[0][0])):
    assert_close(a, b, jnp.float32, "params")


def test_schedule_warmup_then_cosine_to_zero_in_tokens():
  cfg = run_config.base_config().optim
  cfg.update({"peak_lr": 1e-3, "warmup_tokens": 400, "total_tokens": 2000})
  lrs = np.array([optim.step_learning_rate(cfg, 100 * i, 100) for i in range(20)])
  # Step i is valued at the middle of its tokens, (i + 0.5) * 100.
  np.testing.assert_allclose(lrs[:4], [1.25e-4, 3.75e-4, 6.25e-4, 8.75e-4], rtol=FLOAT64_RTOL)
  progress = (np.arange(4, 20) + 0.5 - 4) * 100 / 1600
  np.testing.assert_allclose(lrs[4:], 0.5e-3 * (1 + np.cos(np.pi * progress)), rtol=FLOAT64_RTOL)
  assert 0 < lrs[-1] < 1e-5
  # Doubling the batch halves the steps, not the shape over tokens.
  np.testing.assert_allclose([optim.step_learning_rate(cfg, 200 * k, 200) for k in range(10)],
                             [optim.learning_rate(200 * k + 100, 1e-3, 400, 2000) for k in range(10)],
                             rtol=FLOAT64_RTOL)
  # The cosine ends with the last whole step: 2000 tokens in steps of 300 end at 2100.
  last = optim.step_learning_rate(cfg, 1800, 300)
  assert last == pytest.approx(optim.learning_rate(1950, 1e-3, 400, 2100), rel=FLOAT64_RTOL)


def test_weight_decay_mask_skips_biases_norms_and_gate_biases():
  setup = train_lib.build(tiny_config(forget_gate="full"), one_device())
  mask = optim.decay_mask(setup.abstract_state["params"])
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["layers/0/attn/q_proj/kernel"] and flat["layers/0/mlp/up_proj/kernel"]
  assert flat["embed/embedding"] and flat["lm_head/kernel"]
  assert not flat["layers/0/attn/fgate_proj/bias"]
  assert not flat["layers/0/attn_norm/scale"] and not flat["final_norm/scale"]
  assert not flat["layers/0/attn/q_norm/scale"] and not flat["layers/0/attn/output_norm/scale"]
  bias_only = train_lib.build(tiny_config(forget_gate="bias_only"), one_device())
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(optim.decay_mask(bias_only.abstract_state["params"]))[0]}
  assert not flat["layers/0/attn/fgate_bias"]


def test_fixed_gate_constants_reach_the_step():
  """A 'fixed' forget gate is non-trainable state: it must be a value inside the step."""
  c = tiny_config(steps=1, forget_gate="fixed", decay_time_min=2.0, decay_time_max=64.0)
  setup = train_lib.build(c, one_device())
  data = PackedDataset(corpus_from_config(c.data, "train"), c.data.seq_len, 0)
  state = train_lib.init_state(setup, 0)
  _, m = setup.train_step(state, train_lib.load_batch(setup, train_lib.rows_loader(setup, data, 0, 4, 1), 4, 1), 1e-3)
  assert bool(m["finite"]) and 0 < float(m["loss"]) < 10


def test_bf16_compute_keeps_float32_params_and_optimizer_state():
  c = tiny_config(dtype="bfloat16")
  setup = train_lib.build(c, one_device())
  leaves = jax.tree.leaves(setup.abstract_state["params"]) + jax.tree.leaves(
      setup.abstract_state["opt_state"])
  assert all(x.dtype in (jnp.float32, jnp.int32) for x in leaves)


@pytest.mark.slow
def test_metrics_with_pruning_log_kept_tile_fraction(tmp_path):
  c = tiny_config(steps=2, seq_len=128, batch=2, attn_impl="xla")
  c.model.overrides.pruning = {"log_tolerance": -10.0, "qk_bound": "auto"}
  c.model.overrides.block_sizes = {"block_q": 32, "block_k": 32}
  train_lib.train(c, str(tmp_path), devices=one_device())
  lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  steps = [l for l in lines if "loss" in l]
  assert [l["step"] for l in steps] == [1, 2]
  for l in steps:
    assert 0.0 < l["kept_tile_fraction"] <= 1.0
    assert l["tokens_per_s"] > 0 and l["grad_norm"] > 0 and l["lr"] > 0
  assert os.listdir(os.path.join(tmp_path, "tensorboard"))

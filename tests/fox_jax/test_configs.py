"""Every experiment config loads, overrides from the command line, and builds abstractly."""

import glob
import os

import jax
import pytest

from fox_jax import run_config
from fox_jax import train as train_lib
from fox_jax.cli import split_overrides

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")))


def _load(path, *overrides):
  """What fox-train does with --config and --config.* arguments."""
  c = run_config.load_config_file(path)
  rest, pairs = split_overrides(overrides)
  assert not rest
  run_config.apply_overrides(c, pairs)
  return c


def test_configs_exist():
  assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p)[:-3] for p in CONFIGS])
def test_config_loads_and_builds_its_model_abstractly(path):
  c = _load(path)
  run_config.validate(c)
  assert run_config.total_steps(c) >= 1
  # The mesh of a config with -1 spans whatever devices there are (8 simulated CPUs here).
  setup = train_lib.build(c, jax.devices())
  assert setup.num_params > 0
  assert setup.model_cfg.vocab_size >= 259
  assert setup.abstract_state["params"]["embed"]["embedding"].shape == (
      setup.model_cfg.vocab_size, setup.model_cfg.d_model)


def test_command_line_overrides():
  path = os.path.join(REPO, "experiments", "configs", "cpu_fox_pro.py")
  c = _load(path, "--config.optim.peak_lr=1e-3", "--config.mesh.tensor=2",
            "--config.model.overrides.num_layers=2", "--config.eval.length_multiples=(1,2,8)")
  assert c.optim.peak_lr == 1e-3 and c.mesh.tensor == 2
  assert c.model.overrides.num_layers == 2 and tuple(c.eval.length_multiples) == (1, 2, 8)
  assert train_lib.model_config(c).num_layers == 2
  with pytest.raises(run_config.UsageError, match="no such config field"):
    _load(path, "--config.optim.no_such_field=1")

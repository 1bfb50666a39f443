"""Every experiment config loads, overrides from the command line, and builds abstractly."""

import glob
import os

import jax
import pytest

from fox_jax import config_flags, run_config
from fox_jax import train as train_lib
from fox_jax.cli import split_overrides
from fox_jax.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")))
# Files whose get_config takes an argument: every argument besides the default one.
VARIANTS = ["cpu_demo.py:transformer_pro", "cpu_demo.py:fox_llama",
            "paper_2k.py:transformer_pro_125m", "paper_16k_context.py:fox_pro_760m",
            "cpu_mqar.py:transformer_llama"]
SPECS = CONFIGS + [os.path.join(REPO, "experiments", "configs", v) for v in VARIANTS]


def _load(path, *overrides):
  """What fox-train does with --config and --config.* arguments."""
  c = run_config.load_config_file(path)
  rest, pairs = split_overrides(overrides)
  assert not rest
  config_flags.apply_overrides(c, pairs)
  return c


def test_configs_exist():
  assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", SPECS, ids=[os.path.basename(p).replace(".py", "") for p in SPECS])
def test_config_loads_and_builds_its_model_abstractly(path):
  c = _load(path)
  run_config.validate(c)
  assert run_config.total_steps(c) >= 1
  # The mesh of a config with -1 spans whatever devices there are (8 simulated CPUs here).
  setup = train_lib.build(c, jax.devices())
  assert setup.num_params > 0
  assert setup.model_cfg.vocab_size >= datasets.source(c.data).vocab(c.data)[0]
  assert setup.abstract_state["params"]["embed"]["embedding"].shape == (
      setup.model_cfg.vocab_size, setup.model_cfg.d_model)


def test_command_line_overrides():
  path = os.path.join(REPO, "experiments", "configs", "cpu_demo.py:fox_pro")
  c = _load(path, "--config.optim.peak_lr=1e-3", "--config.mesh.tensor=2",
            "--config.model.overrides.num_layers=2", "--config.eval.length_multiples=(1,2,8)")
  assert c.optim.peak_lr == 1e-3 and c.mesh.tensor == 2
  assert c.model.overrides.num_layers == 2 and tuple(c.eval.length_multiples) == (1, 2, 8)
  assert train_lib.model_config(c).num_layers == 2
  with pytest.raises(run_config.UsageError, match="no such config field"):
    _load(path, "--config.optim.no_such_field=1")


def test_config_arguments(tmp_path):
  """``path:arg`` calls get_config(arg); files differing only in the family are one file."""
  demo = os.path.join(REPO, "experiments", "configs", "cpu_demo.py")
  assert _load(demo).model.preset == "fox_pro_tiny"  # the default argument
  assert _load(demo + ":transformer_pro").model.preset == "transformer_pro_tiny"
  with pytest.raises(run_config.UsageError,
                     match=r"^--config .*cpu_demo.py:mamba: get_config\(\) raised ValueError: "
                           r"the argument must be one of fox_pro, transformer_pro"):
    _load(demo + ":mamba")
  acp = os.path.join(REPO, "experiments", "configs", "cpu_fox_pro_acp.py")
  with pytest.raises(run_config.UsageError, match=r"get_config\(\) of .* takes no argument"):
    _load(acp + ":x")
  with pytest.raises(run_config.UsageError, match=r"^--config: no such file: .*nope.py:fox_pro$"):
    _load(os.path.join(REPO, "nope.py:fox_pro"))
  needs = tmp_path / "needs.py"
  needs.write_text('def get_config(family):\n  """family: a or b"""\n')
  with pytest.raises(run_config.UsageError,
                     match=r"needs an argument: --config .*needs.py:ARG \(family: a or b\)$"):
    _load(str(needs))
  # An argument may hold ':'; *args / **kwargs do not make one required.
  star = tmp_path / "star.py"
  star.write_text("import ml_collections\n"
                  "def get_config(*args):\n"
                  "  return ml_collections.ConfigDict({'args': list(args)})\n")
  assert run_config.load_config_file(str(star)).args == []
  assert run_config.load_config_file(f"{star}:a:b").args == ["a:b"]

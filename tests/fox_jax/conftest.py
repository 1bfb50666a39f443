import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A tiny FoX (Pro) run (test_train's tiny_config, 2 steps on one device), trained once per
  test process. Tests take a private copy (``copy_run``) before writing into it."""
  from fox_jax import train as train_lib
  from tests.fox_jax.test_train import one_device, tiny_config
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "fox")
  train_lib.train(tiny_config(steps=2), workdir, devices=one_device())
  return workdir


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory):
  """A module's own copy of the tiny run."""
  return shutil.copytree(tiny_run, str(tmp_path_factory.mktemp("run") / "fox"))

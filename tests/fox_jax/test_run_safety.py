"""Nothing lost, nothing silent: run directories, checkpoints and the command line under
a hostile but honest user (wrong configs, corrupt files, two processes, signals, a full
disk). Every test here failed before the behaviour it checks existed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from fox_jax import checkpoint as ckpt_lib
from fox_jax import config_flags, optim, run_config, rundir
from fox_jax import train as train_lib
from fox_jax.cli import eval_main, train_main
from fox_jax.data import dataset_from_config
from fox_jax.errors import UsageError
from fox_jax.evaluate import evaluate_run
from fox_jax.metrics import read_jsonl
from fox_jax.signals import Interrupted, StopSignals
from tests.fox_jax.test_train import REPO, one_device, tiny_config

CONFIG = os.path.join(REPO, "experiments/configs/cpu_demo.py:fox_pro")
# What test_train's tiny_config sets, as command-line flags for a subprocess.
TINY_FLAGS = ["--config", CONFIG, "--config.data.seq_len=32", "--config.data.global_batch=8",
              "--config.model.overrides.num_layers=1", "--config.model.overrides.d_model=64",
              "--config.model.overrides.dtype=float32",
              "--config.model.overrides.attn_impl=reference", "--config.run.log_every=1",
              "--config.run.val_rows=4", "--config.run.progress_bar=False",
              "--config.mesh.fsdp=-1"]
MAIN = "import sys; from fox_jax.cli import train_main; sys.exit(train_main())"


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _spawn(args, prelude=""):
  return subprocess.Popen([sys.executable, "-c", prelude + MAIN] + args, env=_env(), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_line(err: str) -> str:
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


def _params(state):
  return jax.tree.leaves(jax.device_get(state["params"]))


def _assert_same_params(a, b):
  for x, y in zip(_params(a), _params(b)):
    np.testing.assert_array_equal(x, y)


def _restore(workdir, c, step=None):
  setup = train_lib.build(c, one_device())
  ck = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step = ck.latest_step() if step is None else step
    return ck.restore(step, setup.abstract_state)
  finally:
    ck.close()


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("field, value", [
    ("run.keep_checkpoints", 0), ("run.checkpoint_every", 0), ("run.log_every", 0),
    ("run.val_rows", 0), ("optim.peak_lr", float("nan")), ("optim.peak_lr", float("inf")),
    ("model.overrides.vocab_size", 100), ("optim.peak_l", 1e-3), ("model.overides", {})])
def test_unusable_fields_fail_at_start_naming_the_field(tmp_path, field, value):
  c = tiny_config(steps=1)
  *blocks, name = field.split(".")
  node = c
  for b in blocks:
    node = node[b]
  node[name] = value
  workdir = tmp_path / "run"
  with pytest.raises(UsageError, match=field.replace(".", r"\.")):
    train_lib.train(c, str(workdir), devices=one_device())
  assert not workdir.exists()


def test_overrides_of_a_saved_config_parse_like_the_file_s():
  """A config read back from config.json holds lists where the file had tuples."""
  c = run_config.config_from_json(run_config.config_to_json(tiny_config()), "config.json")
  config_flags.apply_overrides(c, [("eval.length_multiples", "(1,2)")])
  assert list(c.eval.length_multiples) == [1, 2]


@pytest.mark.parametrize("preset, gate, pinned", [
    ("transformer_pro_tiny", None, "forgetting"),    # a Transformer preset
    ("fox_llama_tiny", "none", "forgetting"),        # a FoX preset with its gate off
    ("fox_pro_tiny", None, None),                    # gated: nothing to pin
])
def test_a_version_1_transformer_keeps_the_attention_it_ran(preset, gate, pinned):
  """Before config version 2, forget gate 'none' ran the forgetting op with a zero gate; a
  saved run of that age keeps it (resuming stays bitwise), and a config asking for plain
  attention is a change resume_changes reports and allows."""
  c = tiny_config()
  c.model.preset = preset
  if gate is not None:
    c.model.overrides.forget_gate = gate
  saved = json.loads(run_config.config_to_json(c))
  del saved["version"]
  loaded = run_config.config_from_json(json.dumps(saved), "config.json")
  assert loaded.version == run_config.CONFIG_VERSION
  assert loaded.model.overrides.get("plain_attn_impl") == pinned
  assert loaded.data.loader == "packed"   # the stream it read (config version < 3)
  run_config.check_fields(loaded)
  c_resumed = ml_collections.ConfigDict(c.to_dict())
  run_config.resolve_loader(c_resumed, loaded)   # "auto": the run's own loader
  assert c_resumed.data.loader == "packed"
  changes = run_config.resume_changes(loaded, c_resumed)
  if pinned is None:
    assert changes == {}, changes
  else:
    assert list(changes) == ["model.plain_attn_impl"], changes
    assert train_lib.model_config(loaded).plain_attn_impl == "forgetting"
  # A config saved now reads back as it was.
  run_config.resolve_loader(c, None)
  assert c.data.loader == "grain"
  again = run_config.config_from_json(run_config.config_to_json(c), "config.json")
  assert run_config.resume_changes(again, c) == {}
  assert again.model.overrides.get("plain_attn_impl") is None


def test_metrics_lines_fox_train_did_not_write_are_kept(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "loss": 2}\n{"step": "x"}\n{"step": null, "note": 1}\n'
            '{"step": 3, "loss": 1}\n{"step": 4')
  assert rundir.truncate_jsonl(path, 2) == 2
  assert [json.loads(l) for l in open(path)] == [
      {"step": 1, "loss": 2}, {"step": "x"}, {"step": None, "note": 1}]
  assert rundir.last_logged_step(path) == 1


def test_relative_data_path_is_saved_absolute(tmp_path, monkeypatch):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(12):
    (corpus / f"doc{i}.txt").write_text(f"document {i} " * 40)
  monkeypatch.chdir(tmp_path)
  c = tiny_config(steps=1)
  c.data.source, c.data.path, c.data.heldout_fraction = "text", "corpus", 0.5
  train_lib.train(c, "run", max_steps=0, devices=one_device())
  saved = rundir.load_config(str(tmp_path / "run"))
  assert saved.data.path == str(corpus)
  # No step taken, no checkpoint: the directory may still start over with another config.
  assert ckpt_lib.Checkpointer("run", read_only=True).all_steps() == []
  c.data.seq_len = 16
  train_lib.train(c, "run", max_steps=0, devices=one_device())
  assert rundir.load_config("run").data.seq_len == 16


def test_every_model_field_is_overridable_from_the_command_line():
  c = run_config.load_config_file(CONFIG)
  config_flags.apply_overrides(c, [("model.overrides.num_kv_heads", "2"),
                                 ("model.overrides.head_dim", "None"),
                                 ("model.overrides.pruning.log_tolerance", "-8"),
                                 ("model.overrides.block_sizes.block_q", "64"),
                                 ("optim.total_tokens", "2.5e6")])
  m = train_lib.model_config(c)
  assert m.num_kv_heads == 2 and m.pruning.log_tolerance == -8.0
  assert m.block_sizes.block_q == 64 and c.optim.total_tokens == 2_500_000
  config_flags.apply_overrides(c, [("model.overrides.pruning.qk_bound", "5.0")])
  assert train_lib.model_config(c).pruning.qk_bound == 5.0
  with pytest.raises(UsageError, match=r"did you mean --config\.model\.overrides\.num_kv_heads\?"):
    config_flags.apply_overrides(c, [("model.overrides.num_kv_head", "2")])
  with pytest.raises(UsageError, match=r"--config\.data\.seq_len takes an int"):
    config_flags.apply_overrides(c, [("data.seq_len", "long")])


# ----------------------------------------------------------------------------- resuming


def test_resume_refuses_a_changed_model_and_keeps_the_saved_config(tmp_path):
  workdir = str(tmp_path / "run")
  c = tiny_config(steps=4)
  c.run.checkpoint_every = 1
  train_lib.train(c, workdir, max_steps=1, devices=one_device())
  saved_text = open(rundir.config_path(workdir)).read()
  for change in ({"num_layers": 2}, {"forget_gate": "none"}):
    other = tiny_config(steps=4, **change)
    with pytest.raises(UsageError, match=r"refused changes: model\.(num_layers|forget_gate)"):
      train_lib.train(other, workdir, devices=one_device())
    assert open(rundir.config_path(workdir)).read() == saved_text
  # The model is compared as it resolves: the derived num_kv_heads spelled out, another
  # implementation of the same attention and rematerialisation are no change.
  same = tiny_config(steps=4, num_kv_heads=4, attn_impl="xla", remat=True,
                     block_sizes={"block_q": 16, "block_k": 16})
  same.run.checkpoint_every = 1
  assert train_lib.train(same, workdir, max_steps=2, devices=one_device()).step == 2
  [change] = read_jsonl(os.path.join(workdir, rundir.HISTORY_FILE))
  assert sorted(change["changed"])[:2] == ["model.attn_impl", "model.block_sizes"]
  assert sorted(change["changed"])[-1] == "model.remat"
  saved_text = open(rundir.config_path(workdir)).read()
  other = tiny_config(steps=4, seq_len=64)
  with pytest.raises(UsageError, match=r"data\.seq_len: 32 -> 64"):
    train_lib.train(other, workdir, devices=one_device())
  assert open(rundir.config_path(workdir)).read() == saved_text
  assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == [1, 2]

  # Without config.json the checkpoints' own copy of the config is the reference.
  os.remove(rundir.config_path(workdir))
  with pytest.raises(UsageError, match=r"refused changes: model\.num_layers"):
    train_lib.train(tiny_config(steps=4, num_layers=2), workdir, devices=one_device())
  assert not os.path.exists(rundir.config_path(workdir))
  train_lib.train(same, workdir, max_steps=3, devices=one_device())
  assert rundir.load_config(workdir).model.overrides.remat is True  # written back


def test_resume_with_another_batch_counts_the_rows_consumed(tmp_path):
  """Allowed changes are recorded; the data position and the schedule follow the tokens."""
  workdir = str(tmp_path / "run")
  c = tiny_config(steps=8)
  train_lib.train(c, workdir, max_steps=2, devices=one_device())
  c.data.global_batch = 8
  c.run.log_every = 2
  result = train_lib.train(c, workdir, max_steps=3, devices=one_device())
  assert result.step == 3
  _, meta = _restore(workdir, c)
  assert meta["data_position"] == 2 * 4 + 8
  assert rundir.load_config(workdir).data.global_batch == 8
  [change] = read_jsonl(os.path.join(workdir, rundir.HISTORY_FILE))
  assert change["step"] == 2 and change["changed"]["data.global_batch"] == [4, 8]
  lr3 = [m["lr"] for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if m["step"] == 3]
  want = optim.step_learning_rate(c.optim, (2 * 4) * 32, 8 * 32)
  assert lr3 == [pytest.approx(want, rel=1e-6)]


def test_metrics_are_cut_back_to_the_restored_step(tmp_path):
  """A run killed after its last checkpoint logged steps that the resumed run repeats."""
  workdir = str(tmp_path / "run")
  c = tiny_config(steps=4)
  c.run.checkpoint_every = 2
  train_lib.train(c, workdir, max_steps=2, devices=one_device())
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "a") as f:  # what steps 3 and 4 of a killed process left behind
    f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
  train_lib.train(c, workdir, devices=one_device())
  steps = [m["step"] for m in read_jsonl(path) if "loss" in m]
  assert steps == [1, 2, 3, 4]
  assert all(m["loss"] != 9.0 for m in read_jsonl(path) if "loss" in m)


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("lr, head_scale", [(float("nan"), 1.0), (float("inf"), 1.0),
                                             (1e38, 1e4)])
def test_the_step_returns_its_input_state_when_the_update_is_not_finite(lr, head_scale):
  """Checking the loss and the gradient is not enough: with weights ~200 (the scaled head)
  and lr 1e38 both are finite, but AdamW's decoupled decay lr * 0.1 * w overflows."""
  c = tiny_config(steps=1)
  setup = train_lib.build(c, one_device())
  data = dataset_from_config(c.data, "train")
  state = train_lib.init_state(setup, 0)
  state["params"]["lm_head"]["kernel"] = state["params"]["lm_head"]["kernel"] * head_scale
  before = jax.device_get(state)
  new, m = setup.train_step(state, train_lib.load_batch(setup, train_lib.rows_loader(setup, data, 0, 4, 1), 4, 1), lr)
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert not bool(m["finite"])
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new))):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- broken checkpoints


def _corrupt(step_dir: str, how: str) -> None:
  state = os.path.join(step_dir, "state")
  data = sorted((os.path.getsize(os.path.join(r, f)), os.path.join(r, f))
                for r, _, fs in os.walk(os.path.join(state, "ocdbt.process_0")) for f in fs)
  if how == "truncated":
    with open(data[-1][1], "r+b") as f:
      f.truncate(data[-1][0] // 2)
  elif how == "missing":
    os.remove(data[-1][1])
  elif how == "manifest":
    with open(os.path.join(state, "manifest.ocdbt"), "wb") as f:
      f.write(b"not a manifest")
  elif how == "data_state":  # the data loader's state: the run would read other rows
    with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
      f.write('{"position": 0}')
  elif how == "flipped":  # the same size, one byte changed: only a checksum sees it
    with open(data[-1][1], "r+b") as f:
      f.seek(data[-1][0] // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4, and its final state."""
  c = tiny_config(steps=4)
  c.run.checkpoint_every = 2
  workdir = str(tmp_path_factory.mktemp("four_steps") / "run")
  return c, workdir, jax.device_get(train_lib.train(c, workdir, devices=one_device()).state)


@pytest.mark.parametrize("how", ["truncated", "missing", "manifest", "flipped", "data_state"])
def test_a_broken_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, how,
                                                                 four_steps):
  c, template, straight_state = four_steps
  workdir = str(tmp_path / "run")
  shutil.copytree(template, workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "4"), how)
  capsys.readouterr()

  # Evaluation reads only: it falls back, says so in one line, and moves nothing.
  result = evaluate_run(workdir)
  assert result["step"] == 2
  line = _one_line(capsys.readouterr().err)
  assert "checkpoint step 4 cannot be restored" in line
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))

  # Training moves the broken one aside (never deletes it) and redoes steps 3 and 4.
  resumed = train_lib.train(c, workdir, devices=one_device())
  line = _one_line(capsys.readouterr().err)
  moved = os.path.join(workdir, ckpt_lib.BROKEN_DIR, "4")
  assert "checkpoint step 4 cannot be restored" in line and moved in line
  assert os.path.isdir(moved)
  assert resumed.step == 4
  _assert_same_params(resumed.state, straight_state)


def test_every_checkpoint_broken_is_an_error_not_a_fresh_start(tmp_path):
  c = tiny_config(steps=4)
  c.run.checkpoint_every = 2
  workdir = str(tmp_path / "run")
  train_lib.train(c, workdir, devices=one_device())
  for step in (2, 4):
    _corrupt(os.path.join(workdir, "checkpoints", str(step)), "missing")
  files = sorted(os.listdir(workdir))
  for attempt in range(2):  # the second try must not start over either
    with pytest.raises(UsageError, match=r"no checkpoint .* can be restored.*step 4: .*step 2: "):
      train_lib.train(c, workdir, devices=one_device())
    assert sorted(os.listdir(workdir)) == files
    assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == [2, 4]
  with pytest.raises(UsageError, match="no checkpoint .* can be restored"):
    evaluate_run(workdir)


def test_a_signal_during_start_up_leaves_nothing_behind(tmp_path):
  """Signals only set a flag; start-up stops at its next safe point and undoes its work."""
  c = tiny_config(steps=2)
  signals = StopSignals()
  signals.received = "SIGTERM"
  fresh = tmp_path / "a" / "b" / "run"
  with pytest.raises(Interrupted):
    train_lib.train(c, str(fresh), devices=one_device(), signals=signals)
  assert not (tmp_path / "a").exists()
  workdir = str(tmp_path / "run")
  train_lib.train(c, workdir, max_steps=1, devices=one_device())
  before = {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)}
  with pytest.raises(Interrupted):
    train_lib.train(c, workdir, devices=one_device(), signals=signals)
  assert {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)} == before


def test_a_failed_start_keeps_a_parent_another_run_uses(tmp_path, monkeypatch):
  """Start-up removes the parents it created only while they are empty: another job of a
  sweep may have started in one meanwhile."""
  c = tiny_config(steps=2)
  signals = StopSignals()
  other = tmp_path / "sweep" / "a"
  init = train_lib.init_state

  def init_while_another_run_starts(*args):
    other.mkdir()
    (other / "config.json").write_text("{}")
    signals.received = "SIGTERM"
    return init(*args)
  monkeypatch.setattr(train_lib, "init_state", init_while_another_run_starts)
  with pytest.raises(Interrupted):
    train_lib.train(c, str(tmp_path / "sweep" / "b"), devices=one_device(), signals=signals)
  assert sorted(os.listdir(tmp_path / "sweep")) == ["a"]
  assert (other / "config.json").read_text() == "{}"


def test_integrity_is_recorded_once_a_save_completes(tmp_path):
  """Not at the next save: a process killed before it must still leave a checked
  checkpoint behind."""
  c = tiny_config(steps=1)
  setup = train_lib.build(c, one_device())
  ck = ckpt_lib.Checkpointer(str(tmp_path), 2)
  ck.save(1, train_lib.init_state(setup, 0), {"step": 1, "data_position": 0})
  record = os.path.join(ck.step_dir(1), ckpt_lib.INTEGRITY_FILE)
  deadline = time.time() + 60
  while not os.path.exists(record) and time.time() < deadline:
    ck.check()
    time.sleep(0.05)
  assert os.path.exists(record)
  assert oct(os.stat(record).st_mode & 0o777) == oct(0o666 & ~_umask())
  ck.close()


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


# ----------------------------------------------------------------------------- one process per run


def test_a_held_run_directory_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
  c = tiny_config(steps=1)
  workdir = tmp_path / "run"
  workdir.mkdir()
  with rundir.RunLock(str(workdir)):
    with pytest.raises(UsageError, match=r"in use by another fox-train \(pid \d+ on "):
      train_lib.train(c, str(workdir), devices=one_device())
  assert sorted(os.listdir(workdir)) == []
  # A lock file left by a process that died (kill -9) holds no lock.
  (workdir / rundir.LOCK_FILE).write_text('{"pid": 999999, "host": "gone", "since": "then"}\n')
  train_lib.train(c, str(workdir), max_steps=0, devices=one_device())
  assert not (workdir / rundir.LOCK_FILE).exists()


def test_a_second_fox_train_on_a_running_directory_exits_2(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from fox_jax.rundir import RunLock; "
       f"lock = RunLock({workdir!r}).acquire(); print('held', flush=True); time.sleep(60)"],
      env=_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    code = train_main(TINY_FLAGS + ["--workdir", workdir])
  finally:
    holder.kill()
    holder.wait()
  assert code == 2
  assert os.listdir(workdir) == [rundir.LOCK_FILE]


# ----------------------------------------------------------------------------- signals and disks


@pytest.mark.slow
def test_sigint_saves_like_sigterm_and_start_up_signals_say_so(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _spawn(TINY_FLAGS + ["--workdir", workdir, "--config.run.checkpoint_every=100000"])
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(read_jsonl(metrics)) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  step = int(out.split("stopped by SIGINT at step ")[1].split(";")[0])
  assert ckpt_lib.Checkpointer(workdir, read_only=True).latest_step() == step >= 2

  # SIGTERM while the process imports, builds and compiles: a message, exit 0.
  proc = _spawn(TINY_FLAGS + ["--workdir", str(tmp_path / "other")])
  time.sleep(1.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "stopped by SIGTERM" in _one_line(err + out)


@pytest.mark.slow
def test_a_failed_save_says_where_keeps_earlier_checkpoints_and_exits_1(tmp_path):
  workdir = str(tmp_path / "run")
  c = tiny_config(steps=8)
  c.mesh.fsdp = 1
  c.run.checkpoint_every = 2
  train_lib.train(c, workdir, max_steps=2, devices=one_device())
  before = _restore(workdir, c, 2)

  # A full disk, as the writer sees it: writes past 200 kB fail (params and optimizer
  # state of this model are ~1 MB; config, metrics and the lock stay far below).
  small_files = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                 "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); ")
  proc = _spawn(["--workdir", workdir], prelude=small_files)
  out, err = proc.communicate(timeout=180)
  assert proc.returncode == 1, err
  line = _one_line(err)
  assert f"saving checkpoint step 4 in {os.path.join(workdir, 'checkpoints')} failed" in line
  assert "newest intact checkpoint: step 2" in line
  assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps() == [2]
  after = _restore(workdir, c, 2)
  _assert_same_params(before[0], after[0])


# ----------------------------------------------------------------------------- command line


def test_fox_train_help_lists_the_flags_and_exits_0(capsys):
  with pytest.raises(SystemExit) as exit_:
    train_main(["--help"])
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--max_steps", "--workdir", "--config.model.overrides.<field>", "num_kv_heads",
               "data.global_batch"):
    assert flag in out


@pytest.mark.parametrize("args, message", [
    (["--config", "missing.py", "--workdir", "{tmp}/run"], "--config: no such file: missing.py"),
    (TINY_FLAGS + ["--workdir", "{tmp}/run", "--config.optim.peak_lrr=1"],
     "--config.optim.peak_lrr: no such config field (did you mean --config.optim.peak_lr?)"),
    (TINY_FLAGS + ["--workdir", "/proc/no/such/run"], "cannot create run directory"),
    (TINY_FLAGS + ["--workdir", "{tmp}/file"], "exists and is not a directory"),
    (TINY_FLAGS + ["--workdir", "{tmp}/run", "--config.data.source=text",
                   "--config.data.path={tmp}/none"], "no such file or directory: "),
    (TINY_FLAGS + ["--workdir", "{tmp}/run", "--config.data.source=text",
                   "--config.data.path={tmp}/empty"], "empty holds no files"),
    (TINY_FLAGS + ["--workdir", "{tmp}/run", "--config.data.source=text",
                   "--config.data.path={tmp}/one"], "split of "),   # one file: a split is empty
    (TINY_FLAGS + ["--workdir", "{tmp}/run", "--config.data.path={tmp}/one"],
     "data.path is given ("),  # builtin reads no path
    (["--workdir", "{tmp}/run"], "--config is required"),
    (TINY_FLAGS + ["--workdir", ""], "--workdir must not be empty"),
    (TINY_FLAGS + ["--workdir", "{tmp}/run", "--max_steps=two"], "invalid int value"),
])
def test_fox_train_user_errors_are_one_line_exit_2_nothing_left(tmp_path, capsys, args, message):
  (tmp_path / "file").write_text("")
  (tmp_path / "empty").mkdir()
  (tmp_path / "one").mkdir()
  (tmp_path / "one" / "a.txt").write_text("a single document\n" * 50)
  argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
  code = None
  try:
    code = train_main(argv)
  except SystemExit as e:
    code = e.code
  assert code == 2
  err = _one_line(capsys.readouterr().err)
  assert message in err
  if "split of" in message:
    assert "has no documents (data.heldout_fraction=0.05" in err and "data.heldout_path" in err
  assert sorted(os.listdir(tmp_path)) == ["empty", "file", "one"]


def test_fox_eval_user_errors_are_one_line_exit_2_nothing_created(tmp_path, capsys):
  c = tiny_config(steps=1)
  empty = tmp_path / "empty"
  empty.mkdir()
  rundir.save_config(c, str(empty))
  good = str(tmp_path / "good")
  train_lib.train(c, good, devices=one_device())
  # A failure in the second run writes nothing for the first one either.
  assert eval_main([good, str(empty), "--out", str(tmp_path / "cmp")]) == 2
  assert "holds no checkpoint" in _one_line(capsys.readouterr().err)
  assert not os.path.exists(os.path.join(good, "eval")) and not (tmp_path / "cmp").exists()
  for runs, message in (([str(tmp_path / "none")], "no such run directory"),
                        ([str(tmp_path)], "not a fox-train run directory"),
                        ([str(empty)], "holds no checkpoint")):
    assert eval_main(runs) == 2
    assert message in _one_line(capsys.readouterr().err)
  assert sorted(os.listdir(empty)) == ["config.json"]


def test_a_finished_run_started_again_logs_nothing_twice(tmp_path):
  c = tiny_config(steps=2)
  workdir = str(tmp_path / "run")
  first = train_lib.train(c, workdir, devices=one_device())
  again = train_lib.train(c, workdir, devices=one_device())
  assert again.step == 2 and again.val_loss == first.val_loss
  lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [l["step"] for l in lines if "val_loss" in l] == [2]
  assert oct(os.stat(rundir.config_path(workdir)).st_mode & 0o777) == oct(0o666 & ~_umask())


def test_setup_cfg_extras_name_jax_builds_that_exist():
  import configparser
  from importlib import metadata
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  extras = {k: v.split() for k, v in cfg["options.extras_require"].items()}
  provided = set(metadata.metadata("jax").get_all("Provides-Extra"))
  for name in ("tpu", "gpu", "cuda12", "cuda13"):
    [req] = extras[name]
    assert req.startswith("jax[") and req[4:-1] in provided, (name, req)
  assert extras["tpu"] == ["jax[tpu]"]

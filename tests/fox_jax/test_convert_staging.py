"""fox-convert's output directory under interruption: staging directories left by killed
runs, signals during staging, write failures, outputs under a file, and bad converted
directories. (The importer's input checks are in test_convert_hostile.py.)"""

import errno
import os
import re
import signal
import socket
import subprocess
import time
import uuid

import pytest

from fox_jax import convert, converted
from tests.fox_jax.test_convert import DATA
from tests.fox_jax.test_convert_hostile import fixture, run_cli


def _dead_pid():
  child = subprocess.Popen(["true"])
  child.wait()
  return child.pid


def test_stale_staging_directories_ignored_and_removed(tmp_path):
  # A run killed with SIGKILL leaves its staging directory: inside an existing output
  # directory it made every later run refuse ("not empty"). Ones of processes that are gone
  # (or of the older naming, without a process) are ignored and removed; one of a live
  # process makes the directory busy.
  host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]
  empty = tmp_path / "empty"
  dead = [empty / f".empty.fox-convert-{host}-{_dead_pid()}-{uuid.uuid4().hex}",
          empty / f".empty.fox-convert-{uuid.uuid4().hex}",
          tmp_path / f".new.fox-convert-{host}-{_dead_pid()}-{uuid.uuid4().hex}"]
  for path in dead:
    (path / "params").mkdir(parents=True)
    # Older than this process's start, which is what marks a pid-less one stale (a minute
    # before now was not: with the module imported earlier it made the test flaky).
    os.utime(path, (converted._RUN_START - 60,) * 2)
  converted.check_output_dir(str(empty), overwrite=False)
  for out in (empty, tmp_path / "new"):
    with pytest.raises(ValueError, match="stop"):
      with converted.staged_output(str(out), overwrite=False):
        raise ValueError("stop")
  assert os.listdir(empty) == [] and os.listdir(tmp_path) == ["empty"]
  live = empty / f".empty.fox-convert-{host}-{os.getppid()}-{uuid.uuid4().hex}"
  live.mkdir()
  with pytest.raises(ValueError, match=r"empty: another fox-convert is writing here "
                     r"\('\.empty\.fox-convert-.*'\); wait for it"):
    converted.check_output_dir(str(empty), overwrite=False)
  assert live.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_while_staging_leaves_nothing(tmp_path, capsys, monkeypatch, signum):
  # SIGTERM used to kill the command inside the staging window, leaving the staging
  # directory behind; both signals now unwind through the cleanup.
  def interrupted(directory, cfg, model):
    (open(os.path.join(directory, "model_config.json"), "w")).close()  # half-written
    os.kill(os.getpid(), signum)
    time.sleep(10)  # the handler raises before this ends

  monkeypatch.setattr(convert, "write_conversion", interrupted)
  # the test's own handlers: had the command none, the signal must not end pytest
  previous = {s: signal.signal(s, lambda *a: None) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    src = os.path.join(DATA, "fox_llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new" / "converted", empty):
      start = time.monotonic()
      status, err = run_cli(capsys, src, out)
      assert time.monotonic() - start < 9
      assert status == 128 + signum and len(err) == 1, (status, err)
      assert f"interrupted by {signal.Signals(signum).name}" in err[0], err
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(empty) == []
    assert all(signal.getsignal(s) is not convert.signals_interrupt for s in previous)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def test_cli_output_under_a_file(tmp_path, capsys):
  d, _, _ = fixture(tmp_path)
  (tmp_path / "a-file").write_text("")
  for out in (tmp_path / "a-file", tmp_path / "a-file" / "converted"):
    status, err = run_cli(capsys, d, out)
    assert status == 2 and len(err) == 1 and err[0].startswith(f"fox-convert: {out}: "), err


def test_cli_write_failure_leaves_nothing(tmp_path, capsys, monkeypatch):
  import orbax.checkpoint as ocp

  def disk_full(self, path, *args, **kwargs):
    os.makedirs(path)  # something half-written first
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", disk_full)
  src = os.path.join(DATA, "fox_llama")
  status, err = run_cli(capsys, src, tmp_path / "new" / "converted")
  assert status == 2 and len(err) == 1 and "No space left on device" in err[0], err
  assert os.listdir(tmp_path) == []
  empty = tmp_path / "empty"  # a directory the user made stays, and stays empty
  empty.mkdir()
  status, err = run_cli(capsys, src, empty)
  assert status == 2 and len(err) == 1, err
  assert os.listdir(tmp_path) == ["empty"] and os.listdir(empty) == []


def test_load_converted_bad_directory(tmp_path):
  with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}/nothing: no such directory"):
    convert.load_converted(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}: no model_config\.json"):
    convert.load_converted(str(tmp_path))
  (tmp_path / "params").mkdir()
  for text, message in [("[]", "model config must be a JSON object, got a list"),
                        ("{", "model config is not valid JSON"),
                        ('{"bogus": 1}', r"not a valid ModelConfig: unknown ModelConfig "
                         r"fields: \['bogus'\]")]:
    (tmp_path / "model_config.json").write_text(text)
    config = re.escape(str(tmp_path / "model_config.json"))
    with pytest.raises(ValueError, match=rf"{config}: {message}"):
      convert.load_converted(str(tmp_path))

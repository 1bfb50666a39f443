"""Input pipeline throughput per data source and worker count, against the training step.

Usage:

    PYTHONPATH=. python benchmarks/data.py                    # every source, workers 0 1 2
    PYTHONPATH=. python benchmarks/data.py --sources text array_record --workers 0 2 --steps 50
    PYTHONPATH=. python benchmarks/data.py --seq_len 1024 --batch 8 --out /tmp/data.md

One table: for each source and ``data.workers``, the grain loader of ``config.data``
(``fox_jax.data.datasets.train_loader(c.data, range(B))``: every row of the global batch, as
one process of a run holds them) is opened, its first batch taken (``first batch s``: with
workers it includes starting the worker processes, which import fox_jax and open the source
again), ``--warmup`` batches more taken, then ``--steps`` batches timed. ``tokens/s`` counts
every row position (B x T per step), ``real tokens/s`` only targets that are not padding
(``Batch.weights`` > 0). Sources, each on data generated here in a temporary directory:

  builtin       this interpreter's standard library (one document per .py file), bytes
  text          a directory of generated text files (pseudo-words), byte tokenizer
  text_hf       the same files with a byte-level BPE tokenizer.json (2048 ids) trained here
  tfds          a TFDS dataset prepared here as ArrayRecord (a Text feature), byte tokenizer
  longcrawl64   a zarr store (format 2) of 65,536-token uint16 documents, chunks 1 x 8192
  array_record  ArrayRecord shards of uint16 token ids, documents of 64 to 8192 ids

The training step beside it is the README main command's model
(``experiments/configs/cpu_demo.py:fox_pro``, at this --seq_len and --batch): ``fox_jax.train``
builds it, and the median time of ``--train-steps`` steps on one fixed batch (after one
compiling step; each step waits for its result, as the training loop does when it checks
``finite``) gives the tokens per second it consumes. ``loader / step`` is the loader's
tokens/s over the step's: below 1 the input is a bottleneck. The training loop takes a batch
only after the previous step has finished (``fox_jax/train.py``: ``bool(m["finite"])`` per
step), so with workers 0 loading and computing add up: a step then takes its time times
(1 + 1 / ratio). Workers load in other processes while the step runs, but on a machine with
few cores they compete with the step's own threads, which this table (loader alone) does not
show.

The script's main module is imported again by every worker (grain starts them with spawn),
so it imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # also for the worker processes (spawn passes sys.path on)
  sys.path.insert(0, REPO)

SOURCES = ("builtin", "text", "text_hf", "tfds", "longcrawl64", "array_record")
TRAIN_CONFIG = "experiments/configs/cpu_demo.py:fox_pro"
LC64_DOC_LEN = 65536
LC64_CHUNK = (1, 8192)


def provenance(title: str) -> list[str]:
  """Markdown comment lines: what ran, when, where, with which versions and commit."""
  import importlib.metadata
  import jax
  devices = jax.devices()
  try:
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    commit += " (with uncommitted changes)" if dirty else ""
  except (OSError, subprocess.CalledProcessError):
    commit = "unknown (not a git checkout)"
  versions = []
  for package in ("jax", "grain", "array_record", "zarr", "tensorflow_datasets", "tokenizers"):
    try:
      versions.append(f"{package} {importlib.metadata.version(package.replace('_', '-'))}")
    except importlib.metadata.PackageNotFoundError:
      versions.append(f"{package} not installed")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return [f"# {title}",
          f"# date: {datetime.datetime.now().isoformat(timespec='minutes')}; device: "
          f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}); "
          f"{cores} CPU cores",
          f"# command: {' '.join(['python'] + sys.argv)}",
          f"# {', '.join(versions)}; python {sys.version.split()[0]}; commit {commit}"]


# ----------------------------------------------------------------------------- generated data


def _words(rng, n: int = 4000) -> list[str]:
  import numpy as np
  letters = list("etaoinshrdlcumwfgypbvkjxqz")
  p = 1.0 / np.arange(1, len(letters) + 1)
  p /= p.sum()
  return ["".join(rng.choice(letters, size=int(rng.integers(1, 11)), p=p)) for _ in range(n)]


def text_documents(num: int, seed: int = 0) -> list[str]:
  """``num`` documents of pseudo-words (Zipf-distributed), 200 B to 32 KB, log-uniform."""
  import numpy as np
  rng = np.random.default_rng(seed)
  words = np.asarray(_words(rng))
  p = 1.0 / np.arange(1, len(words) + 1)
  p /= p.sum()
  docs = []
  for _ in range(num):
    n_words = int(np.exp(rng.uniform(np.log(40), np.log(6000))))
    picked = rng.choice(words, size=n_words, p=p)
    lines = [" ".join(picked[i:i + 12]) + "." for i in range(0, n_words, 12)]
    docs.append("\n".join(lines) + "\n")
  return docs


def make_text(root: str, docs: list[str]) -> str:
  path = os.path.join(root, "text")
  os.makedirs(path, exist_ok=True)
  for i, doc in enumerate(docs):
    with open(os.path.join(path, f"doc{i:05d}.txt"), "w", encoding="utf-8") as f:
      f.write(doc)
  return path


def make_hf_tokenizer(root: str, docs: list[str]) -> str:
  """A byte-level BPE tokenizer.json (2048 ids, <pad> <s> </s>) trained on ``docs``."""
  import json
  import tokenizers
  folder = os.path.join(root, "hf")
  os.makedirs(folder, exist_ok=True)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(docs, trainer)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
  return os.path.join(folder, "tokenizer.json")


def make_tfds(root: str, docs: list[str]) -> str:
  """A TFDS dataset prepared as ArrayRecord, one Text feature; its version directory."""
  import tensorflow_datasets as tfds

  class FoxBenchText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, doc in enumerate(docs):
        yield i, {"text": doc}

  data_dir = os.path.join(root, "tfds")
  tfds.disable_progress_bar()
  with contextlib.redirect_stdout(sys.stderr):  # its "Downloading and preparing" lines
    FoxBenchText(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return os.path.join(data_dir, "fox_bench_text", "1.0.0")


def make_longcrawl64(root: str, num_docs: int, seed: int = 1) -> str:
  import numpy as np
  import zarr
  path = os.path.join(root, "longcrawl64")
  rng = np.random.default_rng(seed)
  array = zarr.create_array(os.path.join(path, "train.zarr"), shape=(num_docs, LC64_DOC_LEN),
                            chunks=LC64_CHUNK, dtype="uint16", zarr_format=2)
  for d in range(num_docs):
    array[d] = rng.integers(0, 50257, LC64_DOC_LEN, dtype=np.uint16)
  return path


def make_array_record(root: str, num_docs: int, shards: int = 4, seed: int = 2) -> str:
  import numpy as np
  from fox_jax.data.array_record import write_array_record
  path = os.path.join(root, "array_record")
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(seed)

  def docs(n):
    for _ in range(n):
      length = int(np.exp(rng.uniform(np.log(64), np.log(8192))))
      yield rng.integers(0, 50257, length, dtype=np.uint16)

  per = -(-num_docs // shards)
  for s in range(shards):
    write_array_record(os.path.join(path, f"train-{s:05d}-of-{shards:05d}.array_record"),
                       docs(min(per, num_docs - s * per)), "uint16")
  return path


def source_configs(names, root: str, notes: list[str]) -> dict:
  """{source: the data config fields that read it} for ``names``, generating their data
  under ``root``; one line per source in ``notes`` (what was generated, how long it took)."""
  from fox_jax.data.sources import stdlib_files
  out = {}
  docs = None
  text_path = None
  for name in names:
    t = time.perf_counter()
    if name in ("text", "text_hf", "tfds") and docs is None:
      docs = text_documents(400)
    if name == "builtin":
      fields = {"source": "builtin"}
      what = f"{len(stdlib_files())} files of the standard library"
    elif name in ("text", "text_hf"):
      text_path = text_path or make_text(root, docs)
      fields = {"source": "text", "path": text_path}
      what = f"{len(docs)} files, {sum(map(len, docs)) / 2**20:.1f} MiB"
      if name == "text_hf":
        fields["tokenizer"] = make_hf_tokenizer(root, docs)
        what += ", BPE tokenizer.json of 2048 ids"
    elif name == "tfds":
      fields = {"source": "tfds", "path": make_tfds(root, docs)}
      what = f"{len(docs)} records, {sum(map(len, docs)) / 2**20:.1f} MiB of text"
    elif name == "longcrawl64":
      fields = {"source": "longcrawl64", "path": make_longcrawl64(root, 16)}
      what = f"16 documents x {LC64_DOC_LEN} uint16, chunks {LC64_CHUNK[0]} x {LC64_CHUNK[1]}"
    elif name == "array_record":
      fields = {"source": "array_record", "path": make_array_record(root, 2000),
                "array_record_dtype": "uint16", "vocab_size": 50257}
      what = "2000 documents of 64-8192 uint16 ids (log-uniform) in 4 shards"
    else:
      raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    out[name] = fields
    notes.append(f"{name}: {what} (generated in {time.perf_counter() - t:.1f} s)")
  return out


# ----------------------------------------------------------------------------- measurements


def data_config(fields: dict, seq_len: int, batch: int, workers: int):
  from fox_jax import run_config
  c = run_config.base_config()
  c.data.update(fields)
  c.data.seq_len, c.data.global_batch, c.data.workers = seq_len, batch, workers
  return c.data


def measure_loader(data_cfg, steps: int, warmup: int) -> dict:
  """Times of one loader: open, first batch, ``steps`` batches after ``warmup``, close."""
  from fox_jax.data import datasets
  B, T = int(data_cfg.global_batch), int(data_cfg.seq_len)
  t0 = time.perf_counter()
  loader = datasets.train_loader(data_cfg, list(range(B)))
  t1 = time.perf_counter()
  try:
    first = next(loader)
    assert first.inputs.shape == (B, T), first.inputs.shape
    t2 = time.perf_counter()
    for _ in range(warmup):
      next(loader)
    real = 0.0
    t3 = time.perf_counter()
    for _ in range(steps):
      real += float(next(loader).weights.sum())
    t4 = time.perf_counter()
  finally:
    loader.close()
  t5 = time.perf_counter()
  dt = max(t4 - t3, 1e-9)
  return {"open": t1 - t0, "first": t2 - t1, "ms": 1e3 * dt / max(steps, 1),
          "tok_s": steps * B * T / dt, "real_s": real / dt,
          "real_frac": real / max(steps * B * T, 1), "close": t5 - t4}


def measure_train_step(seq_len: int, batch: int, steps: int) -> dict:
  """ms per step and tokens/s of the cpu_demo fox_pro training step on a fixed batch."""
  import jax
  import numpy as np
  from fox_jax import run_config
  from fox_jax import train as train_lib
  from fox_jax.data import datasets
  c = run_config.load_config_file(os.path.join(REPO, TRAIN_CONFIG))
  c.data.seq_len, c.data.global_batch = seq_len, batch
  micro = int(c.optim.grad_accum)
  setup = train_lib.build(c)
  state = train_lib.init_state(setup, 0)
  loader = datasets.train_loader(c.data, train_lib.local_lanes(setup, batch, micro, seq_len))
  try:
    rows = train_lib.load_batch(setup, loader, batch, micro)
  finally:
    loader.close()
  t = time.perf_counter()
  state, m = setup.train_step(state, rows, 1e-3)
  bool(m["finite"])
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = setup.train_step(state, rows, 1e-3)
    bool(m["finite"])  # the training loop waits for this every step
    times.append(time.perf_counter() - t)
  ms = 1e3 * float(np.median(times))
  return {"ms": ms, "tok_s": seq_len * batch / (ms / 1e3), "compile": compile_s,
          "devices": len(jax.devices()), "params": setup.num_params}


def _one_line(e: BaseException) -> str:
  return f"{type(e).__name__}: " + ((str(e).strip().splitlines() or [""])[0][:160])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sources", nargs="+", default=["all"],
                 help=f"'all' or some of {', '.join(SOURCES)}")
  p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2],
                 help="data.workers values to run")
  p.add_argument("--steps", type=int, default=50, help="timed batches per loader")
  p.add_argument("--warmup", type=int, default=5, help="batches after the first, not timed")
  p.add_argument("--seq_len", "--seq-len", type=int, default=256)
  p.add_argument("--batch", type=int, default=16, help="global batch (rows per step)")
  p.add_argument("--train-steps", "--train_steps", type=int, default=5,
                 help="timed training steps (0: no training step column)")
  p.add_argument("--out", default="", help="also write the markdown to this file")
  a = p.parse_args(argv)
  names = list(SOURCES) if a.sources == ["all"] else a.sources
  for name in names:
    if name not in SOURCES:
      p.error(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
  B, T = a.batch, a.seq_len
  started = time.perf_counter()
  lines: list[str] = []

  def emit(line: str = "") -> None:
    lines.append(line)
    print(line, flush=True)

  for line in provenance("data.py: input pipeline throughput per source, against the "
                         "training step"):
    emit(line)

  step = None
  if a.train_steps > 0:
    step = measure_train_step(T, B, a.train_steps)
    emit(f"# training step: {TRAIN_CONFIG} ({step['params'] / 1e6:.2f} M parameters) at "
         f"B x T = {B} x {T} on {step['devices']} device(s): {step['ms']:.1f} ms/step "
         f"(median of {a.train_steps}, compiled in {step['compile']:.1f} s) = "
         f"{step['tok_s']:,.0f} tokens/s")

  with tempfile.TemporaryDirectory(prefix="fox_bench_data_") as root:
    notes: list[str] = []
    configs = source_configs(names, root, notes)
    emit("# data (generated in a temporary directory): " + "; ".join(notes))
    emit()
    emit(f"## Grain loader, B x T = {B} x {T}, {a.steps} timed batches after "
         f"{a.warmup + 1} (tokens/s: all row positions; real: targets that are not padding)")
    emit()
    emit("| source | workers | open s | first batch s | ms/batch | tokens/s | real tokens/s "
         "| real % | loader / step | close s |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    failures = []
    for name in names:
      for w in a.workers:
        try:
          r = measure_loader(data_config(configs[name], T, B, w), a.steps, a.warmup)
        except Exception as e:  # noqa: BLE001 -- reported in the table, traceback on stderr
          traceback.print_exc()
          failures.append(f"{name}, workers {w}: {_one_line(e)}")
          emit(f"| {name} | {w} | failed: {_one_line(e)} |||||||| ")
          continue
        ratio = f"{r['tok_s'] / step['tok_s']:,.1f}" if step else "-"
        emit(f"| {name} | {w} | {r['open']:.2f} | {r['first']:.2f} | {r['ms']:.2f} "
             f"| {r['tok_s']:,.0f} | {r['real_s']:,.0f} | {100 * r['real_frac']:.1f} "
             f"| {ratio} | {r['close']:.2f} |")
  emit()
  emit(f"# total {time.perf_counter() - started:.0f} s" +
       (f"; failed: {'; '.join(failures)}" if failures else ""))
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()

"""Does the grain loader stream a corpus larger than memory with flat resident memory?

Usage:

    PYTHONPATH=. python benchmarks/data_memory.py                  # a 4 GB corpus in $TMPDIR
    PYTHONPATH=. python benchmarks/data_memory.py --gb 8 --read-gb 3 --dir /data/scratch
    PYTHONPATH=. python benchmarks/data_memory.py --gb 0.01 --read-gb 0.005   # a smoke run

Writes a corpus of ``--gb`` GB (10^9 bytes) as ArrayRecord shards of uint16 token ids
(``fox_jax.data.array_record.write_array_record``; documents of 1,024 to 65,536 random ids,
log-uniform; one document at a time, so the corpus is never in memory), after checking that
the disk has twice that free (else it refuses with one line), and drops each shard from the
page cache once written (``posix_fadvise DONTNEED`` on that file), so reads go to disk.
Then it reads the corpus through the training loader (``datasets.train_loader``:
``data.source = 'array_record'``, ``data.workers = 0``, every lane of a ``--batch`` x
``--seq_len`` global batch, shuffled as in training) until ``--read-gb`` GB of documents
went into rows, and every ``--every`` batches samples this process's memory:

  consumed GB   document bytes packed into rows so far (real targets x 2 bytes)
  read GB       bytes this process read from files (``rchar`` of /proc/self/io: the shards'
                records, which ArrayRecord reads with pread; page-cache hits count too)
  RSS MiB       resident set size (psutil, else VmRSS), split below into
  anon / file   RssAnon (heap, buffers: what a leak grows) and RssFile (mapped files:
                shared libraries, and the shards if anything mapped them)
  threads       this process's threads
  page cache    the system's page cache (``Cached`` of /proc/meminfo): it grows with the
                data read and is not part of RSS

Below the table: max - min RSS after ``--warmup`` batches, and the slope of RSS against GB
consumed over the same samples (a least-squares fit, MiB per GB). Flat streaming means a
slope near 0. After the loader is closed and dropped: RSS again, and after glibc's
``malloc_trim`` (memory freed but kept by the allocator goes back to the system; what
remains is still referenced). The generated shards are deleted at the end (unless --keep).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from benchmarks.data import provenance  # noqa: E402

GB = 10**9
MIN_DOC, MAX_DOC = 1024, 65536  # tokens per document (log-uniform)


def _proc_fields(path: str, names) -> dict:
  """{name: int} of ``name: value`` lines in a /proc file (kB values as given); {} off Linux."""
  out = {}
  try:
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in names:
          out[key] = int(value.split()[0])
  except OSError:
    pass
  return out


def memory_sample() -> dict:
  """RSS, its anonymous and file-backed parts (MiB), threads, bytes read, page cache (MiB)."""
  status = _proc_fields("/proc/self/status", ("VmRSS", "RssAnon", "RssFile", "Threads"))
  try:
    import psutil
    rss = psutil.Process().memory_info().rss / 2**20
  except ImportError:
    rss = status.get("VmRSS", float("nan")) / 1024
  io = _proc_fields("/proc/self/io", ("rchar",))
  meminfo = _proc_fields("/proc/meminfo", ("Cached",))
  nan = float("nan")
  return {"rss": rss, "anon": status.get("RssAnon", nan * 1024) / 1024,
          "file": status.get("RssFile", nan * 1024) / 1024,
          "threads": status.get("Threads", threading.active_count()),
          "rchar": io.get("rchar", 0), "cached": meminfo.get("Cached", nan * 1024) / 1024}


def write_corpus(root: str, total_bytes: int, shard_bytes: int, seed: int = 0):
  """Shards of uint16 documents under ``root`` until ``total_bytes``; (documents, bytes)."""
  import numpy as np
  from fox_jax.data.array_record import write_array_record
  rng = np.random.default_rng(seed)
  written = {"docs": 0, "bytes": 0}
  lo, hi = math.log(MIN_DOC), math.log(MAX_DOC)

  def documents(limit: int):
    """Documents until ``limit`` bytes (one in memory at a time)."""
    start = written["bytes"]
    while written["bytes"] - start < limit and written["bytes"] < total_bytes:
      n = int(math.exp(rng.uniform(lo, hi)))
      n = max(1, min(n, (total_bytes - written["bytes"]) // 2))
      written["docs"] += 1
      written["bytes"] += 2 * n
      yield np.frombuffer(rng.bytes(2 * n), np.uint16)

  shard = 0
  while written["bytes"] < total_bytes:
    path = os.path.join(root, f"train-{shard:05d}.array_record")
    write_array_record(path, documents(shard_bytes), "uint16")
    drop_from_page_cache(path)
    shard += 1
  return written["docs"], written["bytes"], shard


def drop_from_page_cache(path: str) -> None:
  """Writes ``path`` out and asks the kernel to drop its pages from the page cache (this
  file's only), so that the loader reads it from disk; nothing where unsupported."""
  if not hasattr(os, "posix_fadvise"):
    return
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


def malloc_trim() -> bool:
  """Returns freed heap memory to the system (glibc's malloc_trim); False elsewhere."""
  try:
    import ctypes
    return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
  except (OSError, AttributeError):
    return False


def fit_slope(xs, ys) -> float:
  """Least-squares slope of ys against xs (nan with fewer than 2 distinct xs)."""
  n = len(xs)
  mx, my = sum(xs) / max(n, 1), sum(ys) / max(n, 1)
  sxx = sum((x - mx) ** 2 for x in xs)
  if n < 2 or sxx == 0:
    return float("nan")
  return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gb", type=float, default=4.0, help="corpus size, GB (10^9 bytes)")
  p.add_argument("--read-gb", "--read_gb", type=float, default=2.0,
                 help="GB of documents to read through the loader (at most the corpus)")
  p.add_argument("--dir", default=tempfile.gettempdir(), help="where the corpus is written")
  p.add_argument("--shard-mb", "--shard_mb", type=float, default=256.0, help="MB per shard")
  p.add_argument("--seq_len", "--seq-len", type=int, default=4096)
  p.add_argument("--batch", type=int, default=64, help="global batch (rows per step)")
  p.add_argument("--every", type=int, default=0,
                 help="sample memory every this many batches (0: about 25 samples)")
  p.add_argument("--warmup", type=int, default=0,
                 help="batches before the flatness statistics (0: the first 10%%)")
  p.add_argument("--keep", action="store_true", help="keep the generated corpus")
  p.add_argument("--out", default="", help="also write the markdown to this file")
  a = p.parse_args(argv)
  total = int(a.gb * GB)
  os.makedirs(a.dir, exist_ok=True)
  free = shutil.disk_usage(a.dir).free
  if free < 2 * total:
    print(f"refusing: {a.dir} has {free / GB:.1f} GB free, a {a.gb:g} GB corpus needs "
          f"{2 * a.gb:g} GB free")
    sys.exit(1)
  started = time.perf_counter()
  lines: list[str] = []

  def emit(line: str = "") -> None:
    lines.append(line)
    print(line, flush=True)

  for line in provenance("data_memory.py: resident memory while the grain loader streams a "
                         "corpus from disk"):
    emit(line)
  root = tempfile.mkdtemp(prefix="fox_bench_memory_", dir=a.dir)
  try:
    t = time.perf_counter()
    docs, written, shards = write_corpus(root, total, int(a.shard_mb * 1e6))
    wt = time.perf_counter() - t
    on_disk = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))
    emit(f"# corpus: {docs:,} documents of {MIN_DOC}-{MAX_DOC} uint16 ids (log-uniform), "
         f"{written / GB:.2f} GB of ids in {shards} ArrayRecord shards ({on_disk / GB:.2f} GB "
         f"on disk, {a.dir}, {free / GB:.0f} GB free before), written in {wt:.0f} s "
         f"({written / GB / max(wt, 1e-9):.2f} GB/s)")
    run_read(a, root, written, emit)
  finally:
    if a.keep:
      emit(f"# kept the corpus at {root}")
    else:
      shutil.rmtree(root, ignore_errors=True)
  emit(f"# total {time.perf_counter() - started:.0f} s")
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      f.write("\n".join(lines) + "\n")


def run_read(a, root: str, written: int, emit) -> None:
  """Reads the corpus at ``root`` through the loader, sampling memory (module docstring)."""
  from fox_jax import run_config
  from fox_jax.data import datasets
  B, T = a.batch, a.seq_len
  target = min(int(a.read_gb * GB), written)
  expected_steps = max(1, -(-target // (2 * B * T)))
  every = a.every or max(1, expected_steps // 25)
  warmup = a.warmup or max(1, expected_steps // 10)
  c = run_config.base_config()
  c.data.update({"source": "array_record", "path": root, "array_record_dtype": "uint16",
                 "vocab_size": 65536, "seq_len": T, "global_batch": B, "workers": 0})
  before = memory_sample()
  emit(f"# reading: {B} x {T} rows per batch, workers 0, until {target / GB:.2f} GB of "
       f"documents are consumed; memory every {every} batches; flatness after {warmup} "
       f"batches. Before opening the loader: RSS {before['rss']:.0f} MiB, "
       f"{before['threads']} threads")
  emit()
  emit("| batch | consumed GB | read GB | RSS MiB | anon MiB | file MiB | threads "
       "| page cache MiB | tokens/s |")
  emit("|---|---|---|---|---|---|---|---|---|")
  t0 = time.perf_counter()
  loader = datasets.train_loader(c.data, list(range(B)))
  samples = []
  batch = None
  consumed = 0.0
  step = 0
  last_t, last_step = t0, 0

  def sample() -> None:
    nonlocal last_t, last_step
    s = memory_sample()
    now = time.perf_counter()
    tok_s = (step - last_step) * B * T / max(now - last_t, 1e-9)
    last_t, last_step = now, step
    s.update(step=step, consumed=consumed / GB, read=(s["rchar"] - before["rchar"]) / GB)
    samples.append(s)
    emit(f"| {step} | {s['consumed']:.3f} | {s['read']:.3f} | {s['rss']:.0f} | {s['anon']:.0f} "
         f"| {s['file']:.0f} | {s['threads']} | {s['cached']:,.0f} | {tok_s:,.0f} |")

  try:
    sample()
    while consumed < target:
      batch = next(loader)
      consumed += 2.0 * float(batch.weights.sum())
      step += 1
      if step % every == 0:
        sample()
    if step % every:
      sample()
  finally:
    loader.close()
  elapsed = time.perf_counter() - t0
  after = [s for s in samples if s["step"] >= warmup] or samples[-1:]
  rss = [s["rss"] for s in after]
  anon = [s["anon"] for s in after]
  slope = fit_slope([s["consumed"] for s in after], rss)
  emit()
  emit(f"# {step} batches, {consumed / GB:.2f} GB consumed, "
       f"{samples[-1]['read']:.2f} GB read from files, in {elapsed:.0f} s "
       f"({step * B * T / max(elapsed, 1e-9):,.0f} tokens/s)")
  emit(f"# after {warmup} batches ({len(after)} samples): RSS max - min = "
       f"{max(rss) - min(rss):.0f} MiB (anon {max(anon) - min(anon):.0f} MiB), slope "
       f"{slope:+.1f} MiB per GB consumed; RSS at the end {samples[-1]['rss']:.0f} MiB, "
       f"{samples[-1]['rss'] - before['rss']:+.0f} MiB over the process before the loader")
  del loader, batch
  import gc
  gc.collect()
  closed = memory_sample()
  trimmed = memory_sample() if malloc_trim() else None
  emit(f"# after close, del and gc: RSS {closed['rss']:.0f} MiB (anon {closed['anon']:.0f}), "
       f"{closed['threads']} threads" + (
           f"; after malloc_trim: RSS {trimmed['rss']:.0f} MiB (anon {trimmed['anon']:.0f})"
           if trimmed else ""))


if __name__ == "__main__":
  main()

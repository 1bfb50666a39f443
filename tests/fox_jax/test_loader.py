"""The grain loader (fox_jax.data.loader) and training from every document source.

Rows depend on their lane alone (so processes reading only their rows make the same global
batch), the loader's state resumes it exactly (also mid-epoch, across an epoch boundary and
with worker processes), and fox-train trains from a text directory with a SentencePiece
tokenizer, a TFDS dataset, a LongCrawl64 zarr store and ArrayRecord shards, all made here.
"""

import json
import os

import jax
import numpy as np
import pytest

from fox_jax import checkpoint as ckpt_lib
from fox_jax import train as train_lib
from fox_jax.data import datasets, loader as loader_lib
from fox_jax.errors import UsageError
from tests.fox_jax.test_train import one_device, tiny_config


def _corpus(root, n=40, seed=0):
  """n text files of 20 .. 400 bytes: epochs of a few 32-token rows per lane."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    words = " ".join(f"w{int(x)}" for x in rng.integers(0, 50, int(rng.integers(5, 100))))
    with open(os.path.join(root, f"doc{i:03d}.txt"), "w") as f:
      f.write(words)
  return str(root)


def _text_config(path, **data):
  c = tiny_config(steps=6, seq_len=32, batch=4)
  c.data.source = "text"
  c.data.path = path
  c.data.heldout_fraction = 0.2
  c.data.update(data)
  return c


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_row_depends_on_its_lane_alone(tmp_path):
  """Any set of lanes (a process's rows) reads the rows the full batch has there."""
  c = _text_config(_corpus(tmp_path / "c"))
  full = datasets.train_loader(c.data, range(4))
  part = datasets.train_loader(c.data, [1, 3])
  c.data.read_threads = 2  # reading ahead changes no row
  ahead = datasets.train_loader(c.data, range(4))
  for _ in range(12):  # several epochs of this small corpus
    a, b = next(full), next(part)
    assert _same([x[[1, 3]] for x in a], b)
    assert _same(a, next(ahead))
  batch = a
  assert batch.inputs.shape == (4, 32) and batch.inputs.dtype == np.int32
  # Packed rows: segments start at position 0, targets are the next inputs within a
  # segment, padding has segment 0 and no weight.
  seg, pos = batch.segment_ids, batch.positions
  assert np.array_equal(batch.weights, (seg > 0).astype(np.float32))
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  assert np.array_equal(batch.targets[:, :-1][same], batch.inputs[:, 1:][same])
  assert np.all(pos[:, 1:][same] == pos[:, :-1][same] + 1)


def test_the_loader_state_resumes_exactly(tmp_path):
  c = _text_config(_corpus(tmp_path / "c"))
  a = datasets.train_loader(c.data, range(4))
  for _ in range(5):
    next(a)
  state = a.get_state()
  want = [next(a) for _ in range(8)]
  b = datasets.train_loader(c.data, range(4))
  assert b.restore(state, 20, c.data.seed) is None
  assert all(_same(x, y) for x, y in zip(want, (next(b) for _ in range(8))))
  # Another batch (lanes) cannot continue this state: a new, reproducible shuffle.
  other = datasets.train_loader(c.data, range(2))
  note = other.restore(state, 20, c.data.seed)
  assert "restarts at row 20 with a new shuffle" in note
  again = datasets.train_loader(c.data, range(2))
  again.restore(state, 20, c.data.seed)
  assert _same(next(other), next(again))


def test_worker_processes_give_rows_that_resume_exactly(tmp_path):
  c = _text_config(_corpus(tmp_path / "c"), workers=2)
  a = datasets.train_loader(c.data, range(4))
  try:
    for _ in range(3):
      next(a)
    state = a.get_state()
    want = [next(a) for _ in range(4)]
  finally:
    a.close()
  b = datasets.train_loader(c.data, range(4))
  try:
    assert b.restore(state, 12, c.data.seed) is None
    assert all(_same(x, y) for x, y in zip(want, (next(b) for _ in range(4))))
  finally:
    b.close()


def test_training_resumes_bitwise_mid_epoch_on_the_grain_loader(tmp_path):
  """3 + 3 steps with a checkpoint in between == 6 steps; the corpus's epoch ends inside."""
  c = _text_config(_corpus(tmp_path / "c", n=12))
  straight = train_lib.train(c, str(tmp_path / "straight"), devices=one_device())
  split = str(tmp_path / "split")
  c.run.checkpoint_every = 3
  first = train_lib.train(c, split, max_steps=3, devices=one_device())
  assert first.step == 3
  saved = ckpt_lib.Checkpointer(split, read_only=True).data_state(3)
  assert json.loads(saved)["lanes"] == [0, 1, 2, 3]
  resumed = train_lib.train(c, split, devices=one_device())
  assert resumed.step == straight.step == 6
  for x, y in zip(jax.tree.leaves(jax.device_get(straight.state)),
                  jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(x, y)
  assert resumed.val_loss == straight.val_loss


# ----------------------------------------------------------------------------- sources


def _train_two_steps(c, workdir):
  c.optim.total_tokens = 2 * c.data.seq_len * c.data.global_batch
  result = train_lib.train(c, str(workdir), devices=one_device())
  assert result.step == 2 and np.isfinite(result.val_loss)
  return train_lib.load_config(str(workdir))


def test_train_on_text_with_a_sentencepiece_tokenizer(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = _corpus(tmp_path / "c")
  text = tmp_path / "all.txt"
  text.write_text("\n".join(open(os.path.join(corpus, f)).read() for f in os.listdir(corpus)))
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=30, bos_id=1, eos_id=2, pad_id=3, unk_id=0,
                                 minloglevel=2)
  c = _text_config(corpus, tokenizer=str(tmp_path / "sp.model"))
  saved = _train_two_steps(c, tmp_path / "run")
  assert saved.model.overrides.vocab_size == 128   # 30 ids rounded up to a multiple of 128
  rows = datasets.heldout_rows(saved.data, 2)
  assert rows.rows(0, 1).inputs[0, 0] == 1  # a document starts with the tokenizer's BOS
  assert rows.rows(0, 2).inputs.max() < 30


def test_train_on_a_local_tfds_dataset(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class FoxTestLoaderTinyDs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(30)),
              "validation": self._generate_examples(range(100, 104))}

    def _generate_examples(self, keys):
      for k in keys:
        yield k, {"text": f"record {k}: " + "abc " * (k % 13 + 5)}

  FoxTestLoaderTinyDs(data_dir=str(tmp_path / "tfds"), file_format="array_record"
                      ).download_and_prepare()
  path = str(tmp_path / "tfds" / "fox_test_loader_tiny_ds" / "1.0.0")
  c = tiny_config(seq_len=32, batch=4)
  c.data.update({"source": "tfds", "path": path, "tfds_heldout_split": "validation"})
  saved = _train_two_steps(c, tmp_path / "run")
  assert saved.model.overrides.vocab_size == 384
  row = datasets.heldout_rows(saved.data, 1).rows(0, 1)
  assert bytes(row.inputs[0, 1:8].astype(np.uint8)).startswith(b"record")


def test_train_on_a_longcrawl64_store(tmp_path):
  zarr = pytest.importorskip("zarr")
  rng = np.random.default_rng(0)
  for name, docs in (("train.zarr", 8), ("heldout.zarr", 2)):
    z = zarr.create_array(str(tmp_path / "lc" / name), shape=(docs, 128), chunks=(1, 128),
                          dtype="uint16", zarr_format=2)
    z[:] = rng.integers(0, 50257, (docs, 128)).astype(np.uint16)
  c = tiny_config(seq_len=32, batch=4, d_model=32, num_heads=2)
  c.data.update({"source": "longcrawl64", "path": str(tmp_path / "lc")})
  saved = _train_two_steps(c, tmp_path / "run")
  assert saved.model.overrides.vocab_size == 50304  # GPT-2's 50257, padded
  # Each row is one 32-token window of a document, after GPT-2's end-of-text id, unpacked.
  rows = datasets.heldout_rows(saved.data, 8)
  batch = rows.rows(0, 8)
  assert np.all(batch.inputs[:, 0] == 50256) and np.all(batch.segment_ids == 1)
  assert np.array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])


def test_train_on_array_record_shards_and_their_errors(tmp_path):
  from fox_jax.data.array_record import write_array_record
  rng = np.random.default_rng(0)
  (tmp_path / "shards").mkdir()
  for s in range(2):
    write_array_record(str(tmp_path / "shards" / f"train-{s}.array_record"),
                       [rng.integers(0, 1000, int(rng.integers(10, 90))) for _ in range(20)])
  c = tiny_config(seq_len=32, batch=4)
  c.data.update({"source": "array_record", "path": str(tmp_path / "shards")})
  with pytest.raises(UsageError, match="give their number as data.vocab_size"):
    train_lib.train(c, str(tmp_path / "novocab"), devices=one_device())
  assert not os.path.exists(tmp_path / "novocab")
  c.data.vocab_size = 1000
  saved = _train_two_steps(c, tmp_path / "run")
  assert saved.model.overrides.vocab_size == 1024


def test_first_rows_of_an_empty_split_is_one_line():
  class Empty:
    split, tokenized = "heldout", False

    def __len__(self):
      return 3

    def __getitem__(self, i):
      return b""

  with pytest.raises(ValueError, match="heldout split has no documents of two tokens"):
    loader_lib.first_rows(Empty(), "bytes", 8, 2)


def test_token_ids_outside_the_vocabulary_are_an_error_not_clamped(tmp_path):
  """An id >= vocab_size would be clamped by the embedding lookup (silently training on
  other ids, a NaN validation loss): held-out rows are checked before the run directory is
  made, training rows as they are read."""
  from fox_jax.data.array_record import write_array_record
  rng = np.random.default_rng(0)
  good = [rng.integers(0, 100, 40) for _ in range(8)]
  bad = [d.copy() for d in good]
  bad[0][5] = 5000
  for name, docs in (("bad", bad), ("good", good)):
    (tmp_path / name).mkdir()
    write_array_record(str(tmp_path / name / "train-0.array_record"), docs)
  c = tiny_config(seq_len=32, batch=4)
  c.data.update({"source": "array_record", "path": str(tmp_path / "bad"), "vocab_size": 128,
                 "heldout_path": str(tmp_path / "bad")})
  with pytest.raises(UsageError, match="a held-out row holds token id 5000, outside the "
                                       "model's vocabulary of 128"):
    train_lib.train(c, str(tmp_path / "held"), devices=one_device())
  assert not os.path.exists(tmp_path / "held")
  c.data.heldout_path = str(tmp_path / "good")
  c.optim.total_tokens = 8 * 32 * 4  # the bad document is read by step 5
  with pytest.raises(UsageError, match="a training row holds token id 5000"):
    train_lib.train(c, str(tmp_path / "train"), devices=one_device())


@pytest.mark.parametrize("state", [b"[]", b"null", b'"x"', b'{"position": 12}', b"{",
                                   b'{"lanes": [0, 1, 2, 3], "workers": 0, "seed": 0, '
                                   b'"grain": {"parents": "x"}}'])
def test_a_loader_state_that_is_not_the_grain_loaders_restarts_with_a_note(tmp_path, state):
  """A checkpoint's data state that another loader wrote, or an unrecorded damaged one:
  a note and a new shuffle, not a traceback."""
  c = _text_config(_corpus(tmp_path / "c", n=8))
  a = datasets.train_loader(c.data, range(4))
  note = a.restore(state, 12, c.data.seed)
  assert "restarts at row 12 with a new shuffle" in note
  assert "lanes None" not in note
  if b"position" in state:
    assert "packed loader's (row 12)" in note
  next(a)


def test_the_packed_loader_says_when_it_does_not_continue_a_grain_state(tmp_path):
  c = _text_config(_corpus(tmp_path / "c", n=8))
  grain_state = datasets.train_loader(c.data, range(4)).get_state()
  c.data.loader = "packed"
  packed = datasets.train_loader(c.data, range(4))
  assert "is the grain loader's" in packed.restore(grain_state, 8, c.data.seed)
  assert packed.position == 8
  assert packed.restore(b'{"position": 8}', 8, c.data.seed) is None
  assert packed.restore(None, 8, c.data.seed) is None

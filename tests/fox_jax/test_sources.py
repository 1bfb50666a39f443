"""The document sources of fox_jax.data (ArrayRecord shards, local TFDS datasets,
LongCrawl64): each on a tiny dataset written here, checked for its documents, its splits,
pickling (grain workers) and its one-line errors."""

import json
import os
import pickle
import shutil
import sys

import numpy as np
import pytest

from fox_jax.data.source import DataSource


def _key(doc):
  """A hashable form of a document (bytes, or a tuple of token ids)."""
  return doc if isinstance(doc, bytes) else tuple(int(t) for t in doc)


def _docs(source):
  return [_key(source[i]) for i in range(len(source))]


def _check_source(source, split, tokenized):
  assert isinstance(source, DataSource)
  assert source.split == split and source.tokenized is tokenized
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy) == len(source)
  for i in range(len(source)):
    assert _key(copy[i]) == _key(source[i])
    doc = source[i]
    if tokenized:
      assert isinstance(doc, np.ndarray) and doc.ndim == 1
      assert np.issubdtype(doc.dtype, np.integer)
    else:
      assert isinstance(doc, bytes)


def _check_hash_split(open_split, all_docs):
  """Train and held-out by hash: both non-empty, disjoint, together all documents, the same
  when opened again."""
  train, held = open_split("train"), open_split("heldout")
  _check_source(train, "train", train.tokenized)
  _check_source(held, "heldout", held.tokenized)
  t, h = _docs(train), _docs(held)
  assert t and h
  assert not set(t) & set(h)
  assert sorted(t + h) == sorted(all_docs)
  assert _docs(open_split("train")) == t and _docs(open_split("heldout")) == h


# ArrayRecord shards.


def _token_docs(num, seed, high=50_000):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, high, size=int(rng.integers(1, 40))) for _ in range(num)]


@pytest.fixture()
def shards(tmp_path):
  """A directory of two uint16 shards (24 + 16 documents) and a held-out shard (5)."""
  from fox_jax.data.array_record import write_array_record
  docs = _token_docs(40, 0)
  root = tmp_path / "corpus"
  root.mkdir()
  assert write_array_record(str(root / "train-00000-of-00002.array_record"), docs[:24],
                            "uint16") == 24
  write_array_record(str(root / "train-00001-of-00002.array_record"), docs[24:], "uint16")
  (root / "README").write_text("not a shard")
  held = _token_docs(5, 1)
  write_array_record(str(tmp_path / "heldout.array_record"), held, "uint16")
  return root, docs, held


def test_array_record_documents(shards, tmp_path):
  from fox_jax.data.array_record import open_array_record
  root, docs, _ = shards
  src = open_array_record(str(root), "train", dtype="uint16", heldout_fraction=0.0)
  assert len(src) == 40
  _check_source(src, "train", True)
  assert _docs(src) == [_key(d) for d in docs]
  assert src[3].dtype == np.uint16
  # The same shards as a glob and one shard as a file.
  glob_src = open_array_record(str(root / "train-*"), "train", dtype="uint16",
                               heldout_fraction=0.0)
  assert _docs(glob_src) == _docs(src)
  one = open_array_record(str(root / "train-00001-of-00002.array_record"), "train",
                          dtype="uint16", heldout_fraction=0.0)
  assert _docs(one) == [_key(d) for d in docs[24:]]


@pytest.mark.parametrize("dtype, low, high", [("uint32", 0, 2**32), ("int32", -2**31, 2**31),
                                              ("uint16", 0, 2**16)])
def test_array_record_dtypes(tmp_path, dtype, low, high):
  from fox_jax.data.array_record import open_array_record, write_array_record
  rng = np.random.default_rng(2)
  docs = [rng.integers(low, high, size=n, dtype=np.int64) for n in (1, 7, 300)]
  path = str(tmp_path / "x.array_record")
  write_array_record(path, docs, dtype)
  from array_record.python.array_record_data_source import ArrayRecordDataSource
  raw = ArrayRecordDataSource([path])  # the records are the raw little-endian integers
  assert raw[2] == np.asarray(docs[2], np.dtype(dtype).newbyteorder("<")).tobytes()
  src = open_array_record(path, "train", dtype=dtype, heldout_fraction=0.0)
  assert [d.dtype for d in (src[0], src[1], src[2])] == [np.dtype(dtype)] * 3
  assert _docs(src) == [_key(d) for d in docs]


def test_array_record_without_grain(shards, monkeypatch):
  from fox_jax.data.array_record import open_array_record
  root, docs, _ = shards
  monkeypatch.setitem(sys.modules, "grain", None)
  monkeypatch.setitem(sys.modules, "grain.sources", None)
  src = open_array_record(str(root), "train", dtype="uint16", heldout_fraction=0.0)
  assert _docs(src) == [_key(d) for d in docs]


def test_array_record_splits(shards):
  from fox_jax.data.array_record import open_array_record
  root, docs, held = shards
  _check_hash_split(lambda split: open_array_record(str(root), split, dtype="uint16",
                                                    heldout_fraction=0.3),
                    [_key(d) for d in docs])
  heldout_pattern = str(root.parent / "heldout.array_record")
  train = open_array_record(str(root), "train", dtype="uint16", heldout_pattern=heldout_pattern)
  heldout = open_array_record(str(root), "heldout", dtype="uint16",
                              heldout_pattern=heldout_pattern)
  _check_source(heldout, "heldout", True)
  assert _docs(train) == [_key(d) for d in docs]
  assert _docs(heldout) == [_key(d) for d in held]


def test_array_record_errors(shards, tmp_path):
  from fox_jax.data.array_record import open_array_record, write_array_record
  root, _, _ = shards
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"no such file or directory: {missing}$"):
    open_array_record(missing, "train")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"empty holds no ArrayRecord files \(\*\.array_record\*\)"):
    open_array_record(str(empty), "train")
  with pytest.raises(ValueError, match="no files match .*/nothing-\\*"):
    open_array_record(str(tmp_path / "nothing-*"), "train")
  with pytest.raises(ValueError, match="README is not an ArrayRecord file"):
    open_array_record(str(root / "README"), "train")
  big = tmp_path / "big.array_record"  # past the 64 KiB an ArrayRecord file needs at least
  big.write_bytes(np.random.default_rng(0).bytes(200_000))
  with pytest.raises(ValueError, match="big.array_record is not an ArrayRecord file"):
    open_array_record(str(big), "train")
  with pytest.raises(ValueError, match="dtype must be one of"):
    open_array_record(str(root), "train", dtype="int64")
  with pytest.raises(ValueError, match="split must be one of"):
    open_array_record(str(root), "validation")
  with pytest.raises(ValueError, match="split 'heldout' of .* has no documents"):
    open_array_record(str(root), "heldout", dtype="uint16", heldout_fraction=0.0)
  # Records of odd byte length read as uint32: the record and its shard are named.
  odd = str(tmp_path / "odd.array_record")
  write_array_record(odd, [np.arange(4), np.arange(3)], "uint16")
  src = open_array_record(odd, "train", dtype="uint32", heldout_fraction=0.0)
  assert list(src[0]) == [1 << 16, 2 + (3 << 16)]
  with pytest.raises(ValueError, match=r"record 1 of .*odd.array_record has 6 bytes, not a "
                                       r"multiple of 4 \(uint32\)"):
    src[1]
  with pytest.raises(IndexError):
    src[2]
  # Writing: ids out of range, or a directory that does not exist; nothing is left.
  bad = str(tmp_path / "bad.array_record")
  with pytest.raises(ValueError, match="document 1 written to .*bad.array_record holds ids "
                                       "outside uint16"):
    write_array_record(bad, [np.arange(3), np.array([70_000])], "uint16")
  assert not os.path.exists(bad)
  with pytest.raises(OSError, match="cannot write the ArrayRecord file .*/nodir/x"):
    write_array_record(str(tmp_path / "nodir" / "x.array_record"), [np.arange(3)])


# A prepared TFDS dataset.


@pytest.fixture(scope="module")
def tfds_dataset(tmp_path_factory):
  """A TFDS dataset prepared as ArrayRecord: 'train' (20 records) and 'validation' (5), each
  with a Text, two token-id features (Tensor and Sequence) and a float."""
  tfds = pytest.importorskip("tensorflow_datasets")

  def example(k):
    ids = np.arange(k, k + k % 7 + 1, dtype=np.int32)
    return {"text": f"document {k}: caf\u00e9", "ids": ids, "seq": ids * 2,
            "score": np.float32(k)}

  # Not registered: defining it again (another run in this process) is no name clash.
  class FoxTestSourcesTinyDs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "text": tfds.features.Text(),
          "ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "seq": tfds.features.Sequence(np.int32),
          "score": tfds.features.Tensor(shape=(), dtype=np.float32)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(20)),
              "validation": self._generate_examples(range(100, 105))}

    def _generate_examples(self, keys):
      for k in keys:
        yield k, example(k)

  data_dir = tmp_path_factory.mktemp("tfds")
  FoxTestSourcesTinyDs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  version_dir = data_dir / "fox_test_sources_tiny_ds" / "1.0.0"
  assert (version_dir / "dataset_info.json").is_file()
  return version_dir, example


def test_tfds_documents(tfds_dataset):
  from fox_jax.data.tfds_source import open_tfds
  version_dir, example = tfds_dataset
  text = open_tfds(str(version_dir), "train", heldout_split="validation")
  _check_source(text, "train", False)
  assert sorted(_docs(text)) == sorted(example(k)["text"].encode() for k in range(20))
  ids = open_tfds(str(version_dir), "train", feature="ids", heldout_split="validation")
  seq = open_tfds(str(version_dir), "train", feature="seq", heldout_split="validation")
  _check_source(ids, "train", True)
  _check_source(seq, "train", True)
  for i in range(len(text)):  # the same record i for each feature
    k = int(text[i].split(b":")[0].split()[1])
    assert _key(ids[i]) == _key(example(k)["ids"]) and ids[i].dtype == np.int32
    assert _key(seq[i]) == _key(example(k)["seq"])
  # The dataset directory above its only version opens that version.
  above = open_tfds(str(version_dir.parent), "train", heldout_split="validation")
  assert _docs(above) == _docs(text)


def test_tfds_splits(tfds_dataset):
  from fox_jax.data.tfds_source import open_tfds
  version_dir, example = tfds_dataset
  held = open_tfds(str(version_dir), "heldout", heldout_split="validation")
  _check_source(held, "heldout", False)
  assert sorted(_docs(held)) == sorted(example(k)["text"].encode() for k in range(100, 105))
  everything = [example(k)["text"].encode() for k in range(20)]
  _check_hash_split(lambda split: open_tfds(str(version_dir), split, heldout_fraction=0.3),
                    everything)
  ids = open_tfds(str(version_dir), "heldout", feature="ids", heldout_fraction=0.3)
  _check_source(ids, "heldout", True)
  # A TFDS slice as the training split.
  assert len(open_tfds(str(version_dir), "train", train_split="train[:10]",
                       heldout_split="validation")) == 10


def test_tfds_errors(tfds_dataset, tmp_path, monkeypatch):
  from fox_jax.data.tfds_source import open_tfds
  version_dir, _ = tfds_dataset
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"no such TFDS dataset directory: {missing}$"):
    open_tfds(missing, "train")
  with pytest.raises(ValueError, match=f"{tmp_path} is not a prepared TFDS dataset"):
    open_tfds(str(tmp_path), "train")
  with pytest.raises(ValueError, match="has no split 'test'; its splits: train, validation"):
    open_tfds(str(version_dir), "train", train_split="test")
  with pytest.raises(ValueError, match="has no split 'valid'; its splits: train, validation"):
    open_tfds(str(version_dir), "heldout", heldout_split="valid")
  with pytest.raises(ValueError, match="has no feature 'content'; its features: ids, score, "
                                       "seq, text"):
    open_tfds(str(version_dir), "train", feature="content")
  with pytest.raises(ValueError, match="feature 'score' of .* is Tensor .*neither Text nor a "
                                       "1-D integer"):
    open_tfds(str(version_dir), "train", feature="score")
  with pytest.raises(ValueError, match="split must be one of"):
    open_tfds(str(version_dir), "validation")
  # Two versions: name one.
  two = tmp_path / "two_versions"
  shutil.copytree(version_dir, two / "1.0.0")
  shutil.copytree(version_dir, two / "1.2.0")
  with pytest.raises(ValueError, match=r"several versions of the dataset \(1.0.0, 1.2.0\)"):
    open_tfds(str(two), "train")
  assert len(open_tfds(str(two / "1.2.0"), "train", heldout_split="validation")) == 20
  # Prepared as TFRecord (TFDS's default format): refused.
  tfrecord = tmp_path / "tfrecord" / "1.0.0"
  shutil.copytree(version_dir, tfrecord)
  info_path = tfrecord / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(ValueError, match="was prepared as tfrecord, .*prepare it with "
                                       "file_format='array_record'"):
    open_tfds(str(tfrecord), "train")
  # tensorflow-datasets not installed.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ValueError, match=r"pip install 'fox-jax\[data\]'"):
    open_tfds(str(version_dir), "train")


# LongCrawl64.

SEQ = 64  # tokens per document of the tiny stores


@pytest.fixture()
def longcrawl(tmp_path):
  """A LongCrawl64 directory of zarr format-2 stores: train 6 x 64, heldout 3 x 64."""
  zarr = pytest.importorskip("zarr")
  rng = np.random.default_rng(3)
  train = rng.integers(0, 50257, (6, SEQ)).astype(np.uint16)
  heldout = rng.integers(0, 50257, (3, SEQ)).astype(np.uint16)
  for name, data, chunks in (("train", train, (2, 32)), ("heldout", heldout, (1, SEQ))):
    array = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=data.shape, chunks=chunks,
                              dtype="uint16", zarr_format=2)
    array[:] = data
  assert (tmp_path / "train.zarr" / ".zarray").is_file()
  return tmp_path, train, heldout


def _authors_rows(data, seq_len, batch_size):
  """The rows of the authors' LongCrawlDataset.__getitem__ (one process), in order:
  (input_ids, labels) of every batch, transcribed from their code."""
  doc_count = len(data) - len(data) % batch_size
  doc_len = data.shape[1] - data.shape[1] % seq_len
  groups_per_column = doc_count // batch_size
  batch_count = doc_count * doc_len // (seq_len * batch_size)
  rows = []
  for batch_id in range(batch_count):
    column_index, row_index = batch_id // groups_per_column, batch_id % groups_per_column
    start_doc, start_pos = row_index * batch_size, column_index * seq_len
    window = data[start_doc:start_doc + batch_size, start_pos:start_pos + seq_len]
    input_ids = np.roll(np.array(window, np.int64), 1, axis=-1)
    input_ids[..., 0] = 50256
    rows.extend(zip(input_ids, np.array(window, np.int64)))
  return rows


def _pipeline_rows(source, seq_len):
  """The pieces the pipeline cuts from the source's documents: inputs tokens[s:s+n],
  targets tokens[s+1:s+n+1], at most seq_len targets, consecutive pieces sharing a token."""
  rows = []
  for i in range(len(source)):
    doc = source[i]
    for s in range(0, len(doc) - 1, seq_len):
      n = min(seq_len, len(doc) - 1 - s)
      rows.append((doc[s:s + n], doc[s + 1:s + n + 1]))
  return rows


@pytest.mark.parametrize("seq_len, batch_size", [(16, 2), (16, 4), (64, 3), (32, 6)])
def test_longcrawl64_authors_rows(longcrawl, seq_len, batch_size):
  from fox_jax.data.longcrawl64 import open_longcrawl64
  path, train, _ = longcrawl
  num_docs = len(train) - len(train) % batch_size
  src = open_longcrawl64(str(path), "train", seq_len, num_docs=num_docs)
  _check_source(src, "train", True)
  assert len(src) == num_docs * (SEQ // seq_len)
  ours, theirs = _pipeline_rows(src, seq_len), _authors_rows(train, seq_len, batch_size)
  assert len(ours) == len(theirs)
  for (inputs, targets), (input_ids, labels) in zip(ours, theirs):
    assert len(targets) == seq_len  # one whole piece per document: no tails to pack
    np.testing.assert_array_equal(inputs, input_ids)
    np.testing.assert_array_equal(targets, labels)


def test_longcrawl64_windows(longcrawl):
  from fox_jax.data.longcrawl64 import open_longcrawl64
  path, train, heldout = longcrawl
  src = open_longcrawl64(str(path), "train", 16)
  assert len(src) == 6 * 4 and src[0].dtype == np.uint16
  for j in range(len(src)):  # window j // 6 of document j % 6, after the EOT
    column, doc = divmod(j, 6)
    np.testing.assert_array_equal(src[j], [50256, *train[doc, 16 * column:16 * column + 16]])
  np.testing.assert_array_equal(src[-1], src[len(src) - 1])
  # A length that does not divide the document: the tail is dropped (the authors' doc_len).
  src = open_longcrawl64(str(path), "train", 24)
  assert len(src) == 6 * 2
  np.testing.assert_array_equal(src[7], [50256, *train[1, 24:48]])
  held = open_longcrawl64(str(path), "heldout", 32)
  _check_source(held, "heldout", True)
  assert len(held) == 3 * 2
  np.testing.assert_array_equal(held[4], [50256, *heldout[1, 32:64]])
  assert _docs(open_longcrawl64(str(path), "heldout", 32)) == _docs(held)


def test_longcrawl64_errors(longcrawl, tmp_path_factory):
  zarr = pytest.importorskip("zarr")
  from fox_jax.data.longcrawl64 import open_longcrawl64
  path, _, _ = longcrawl
  other = tmp_path_factory.mktemp("other")
  with pytest.raises(FileNotFoundError, match=f"no such LongCrawl64 directory: {other}/x$"):
    open_longcrawl64(str(other / "x"), "train", 16)
  with pytest.raises(ValueError, match=f"{other} holds neither train.zarr nor heldout.zarr"):
    open_longcrawl64(str(other), "train", 16)
  shutil.copytree(path / "train.zarr", other / "train.zarr")
  assert len(open_longcrawl64(str(other), "train", 16)) == 24
  with pytest.raises(ValueError, match=f"{other} has no heldout.zarr"):
    open_longcrawl64(str(other), "heldout", 16)
  with pytest.raises(ValueError, match="seq_len 128 is longer than the 64-token documents"):
    open_longcrawl64(str(path), "train", 128)
  with pytest.raises(ValueError, match="seq_len must be a positive integer"):
    open_longcrawl64(str(path), "train", 0)
  with pytest.raises(ValueError, match=r"num_docs must be an integer in \[1, 6\]"):
    open_longcrawl64(str(path), "train", 16, num_docs=7)
  with pytest.raises(ValueError, match="split must be one of"):
    open_longcrawl64(str(path), "test", 16)
  floats = tmp_path_factory.mktemp("floats")
  zarr.create_array(str(floats / "train.zarr"), shape=(2, 8), dtype="float32", zarr_format=2)
  with pytest.raises(ValueError, match=r"train.zarr holds a float32 array of shape \(2, 8\), "
                                       r"not the 2-D integer array"):
    open_longcrawl64(str(floats), "train", 4)
  flat = tmp_path_factory.mktemp("flat")
  zarr.create_array(str(flat / "train.zarr"), shape=(16,), dtype="uint16", zarr_format=2)
  with pytest.raises(ValueError, match=r"holds a uint16 array of shape \(16,\)"):
    open_longcrawl64(str(flat), "train", 4)
  group = tmp_path_factory.mktemp("group")
  zarr.open_group(str(group / "train.zarr"), mode="w", zarr_format=2)
  with pytest.raises(ValueError, match="train.zarr is a zarr group, not the 2-D integer array"):
    open_longcrawl64(str(group), "train", 4)
  junk = tmp_path_factory.mktemp("junk")
  (junk / "train.zarr").mkdir()
  with pytest.raises(ValueError, match="train.zarr is not a zarr array"):
    open_longcrawl64(str(junk), "train", 4)

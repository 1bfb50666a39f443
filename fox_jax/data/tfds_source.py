"""A prepared TensorFlow Datasets (TFDS) dataset on local disk, as a document source.

Nothing is ever downloaded: ``path`` is a dataset that ``download_and_prepare`` already
wrote, in the ArrayRecord file format (``file_format='array_record'``), which is what
random access by index needs; a dataset prepared as TFRecord can only be read in order and
is refused. It is read with ``tfds.builder_from_directory`` and ``as_data_source``, which
need neither TensorFlow nor the dataset's builder code.

Document i of a split is the named ``feature`` of record i, in the dataset's stored order:

* a ``Text`` feature: the text as UTF-8 ``bytes`` (an untokenized source);
* a 1-D integer ``Tensor`` or ``Sequence`` (``Tensor(shape=(None,), dtype=np.int32)``):
  the token ids as a numpy array (a tokenized source).

The held-out split is a split of the dataset (``heldout_split``, e.g. 'validation') or,
without one, a stable hash of the record index over ``train_split``
(:func:`fox_jax.data.source.hash_split`). Splits may be TFDS slices ('train[:90%]').
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from fox_jax.data.source import SPLITS, DataSource, ReopensLazily, hash_split
from fox_jax.errors import UsageError

_VERSION = re.compile(r"\d+\.\d+\.\d+")


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise UsageError(f"reading a TFDS dataset needs tensorflow-datasets and "
                     f"importlib_resources ({e}): pip install 'fox-jax[data]'") from None
  return tfds


def _one_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def dataset_dir(path: str) -> str:
  """The prepared version directory (holding ``dataset_info.json``) named by ``path``:
  ``path`` itself, or its one version subdirectory ('1.0.0').

  Raises:
    FileNotFoundError: no such directory.
    ValueError: not a prepared TFDS dataset, or several versions to choose from.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such TFDS dataset directory: {path}")
  if not os.path.isdir(path):
    raise ValueError(f"{path} is not a directory (a prepared TFDS dataset is one)")
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  versions = sorted(
      (d for d in os.listdir(path) if _VERSION.fullmatch(d)
       and os.path.isfile(os.path.join(path, d, "dataset_info.json"))),
      key=lambda d: tuple(int(x) for x in d.split(".")))
  if not versions:
    raise ValueError(f"{path} is not a prepared TFDS dataset (no dataset_info.json in it "
                     f"or in a version directory below it)")
  if len(versions) > 1:
    raise ValueError(f"{path} holds several versions of the dataset ({', '.join(versions)}); "
                     f"name one, e.g. {os.path.join(path, versions[-1])}")
  return os.path.join(path, versions[0])


def _file_format(version_dir: str) -> str:
  """The dataset's file format, from dataset_info.json (TFDS's default: 'tfrecord')."""
  info_path = os.path.join(version_dir, "dataset_info.json")
  try:
    with open(info_path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{info_path} cannot be read as a TFDS dataset info "
                     f"({_one_line(e)})") from None
  return str(info.get("fileFormat") or "tfrecord") if isinstance(info, dict) else "tfrecord"


def _split_names(split: str) -> list[str]:
  """The split names in a TFDS split expression ('train[:90%]+validation')."""
  return [part.split("[", 1)[0].strip() for part in split.split("+")]


class TfdsSource(ReopensLazily):
  """Document i = the ``feature`` of record i of one split of a prepared TFDS dataset.

  Attributes:
    path: the dataset's version directory.
    tfds_split: the TFDS split (expression) read.
    feature: the feature a document is.
    tokenized: the feature holds token ids (else text).
    split: 'train' or 'heldout'.
  """

  def __init__(self, path: str, tfds_split: str, feature: str, tokenized: bool, split: str,
               data_source=None):
    self.path = path
    self.tfds_split = tfds_split
    self.feature = feature
    self.tokenized = tokenized
    self.split = split
    self._handle = data_source

  def _open(self):
    return _import_tfds().builder_from_directory(self.path).as_data_source(
        split=self.tfds_split)

  def __len__(self) -> int:
    return len(self.handle())

  def __getitem__(self, index: int):
    value = self.handle()[int(index)][self.feature]
    if self.tokenized:
      return np.asarray(value)
    if isinstance(value, str):
      return value.encode("utf-8")
    return bytes(value)


def _document_kind(tfds, features, feature: str, path: str) -> bool:
  """Whether ``feature`` holds token ids (True) or text (False); ValueError otherwise."""
  if not isinstance(features, tfds.features.FeaturesDict):
    raise ValueError(f"{path}: the records are not a dict of features, so there is no "
                     f"feature {feature!r}")
  if feature not in features.keys():
    raise ValueError(f"{path} has no feature {feature!r}; its features: "
                     f"{', '.join(sorted(features.keys()))}")
  f = features[feature]
  if isinstance(f, tfds.features.Text):
    return False
  try:
    np_dtype, shape = np.dtype(f.np_dtype), tuple(f.shape)
  except (TypeError, AttributeError):
    np_dtype, shape = np.dtype(object), ()
  if np.issubdtype(np_dtype, np.integer) and len(shape) == 1:
    return True
  raise ValueError(f"feature {feature!r} of {path} is {type(f).__name__} (dtype "
                   f"{np_dtype}, shape {shape}), neither Text nor a 1-D integer "
                   f"Tensor/Sequence of token ids")


def open_tfds(path: str, split: str, *, feature: str = "text", train_split: str = "train",
              heldout_split: str = "", heldout_fraction: float = 0.05) -> DataSource:
  """The ``split`` of a prepared local TFDS dataset (module docstring).

  Args:
    path: the dataset's version directory (holding dataset_info.json, e.g.
      ``~/tensorflow_datasets/my_ds/1.0.0``) or the dataset directory above its only
      version.
    split: 'train' or 'heldout'.
    feature: the feature a document is (Text, or a 1-D integer Tensor/Sequence).
    train_split: the TFDS split of the training documents.
    heldout_split: the TFDS split of the held-out documents; empty: a
      ``heldout_fraction`` of ``train_split``'s, by a hash of the record index.
    heldout_fraction: the share held out when there is no ``heldout_split``.

  Returns:
    A source of text (bytes) or token ids, by the feature's type.

  Raises:
    FileNotFoundError: no such path.
    ValueError: not a prepared TFDS dataset, not ArrayRecord, several versions, unknown
      split or feature, an empty split.
    UsageError: tensorflow-datasets is not installed (a ValueError).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if not heldout_split and not 0.0 <= heldout_fraction <= 1.0:
    raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
  version_dir = dataset_dir(path)
  file_format = _file_format(version_dir)
  if file_format != "array_record":
    raise ValueError(f"{version_dir} was prepared as {file_format}, which cannot be read by "
                     f"index; prepare it with file_format='array_record'")
  tfds = _import_tfds()
  try:
    builder = tfds.builder_from_directory(version_dir)
    features = builder.info.features
    known = list(builder.info.splits.keys())
  except Exception as e:  # tfds raises its own exception types
    raise ValueError(f"{version_dir} cannot be opened as a TFDS dataset "
                     f"({_one_line(e)})") from None
  tfds_split = heldout_split if (split == "heldout" and heldout_split) else train_split
  unknown = [s for s in _split_names(tfds_split) if s not in known]
  if unknown:
    raise ValueError(f"{version_dir} has no split {unknown[0]!r}; its splits: "
                     f"{', '.join(known)}")
  tokenized = _document_kind(tfds, features, feature, version_dir)
  try:
    data_source = builder.as_data_source(split=tfds_split)
  except Exception as e:  # tfds raises its own exception types
    raise ValueError(f"split {tfds_split!r} of {version_dir} cannot be read "
                     f"({_one_line(e)})") from None
  label = split if heldout_split else "train"
  source = TfdsSource(version_dir, tfds_split, feature, tokenized, label, data_source)
  if not heldout_split:
    source = hash_split(source, split, heldout_fraction)
  if not len(source):
    raise ValueError(f"split {split!r} of {version_dir} has no documents (TFDS split "
                     f"{tfds_split!r}" + ("" if heldout_split else
                                          f", heldout_fraction={heldout_fraction}") + ")")
  return source

"""Reading Hugging Face checkpoint directories (config.json + safetensors), defensively.

A checkpoint is untrusted input: a downloaded directory whose ``config.json``, index and
safetensors headers may be malformed, truncated or hostile. Everything read here is
validated first, and any problem is a one-line ValueError naming the file and what is
wrong (names and paths from the files are cut short in messages):

* safetensors files (``read_safetensors``): the 8-byte little-endian header length is
  bounded by the file size; the header is a JSON object without duplicate names; every
  tensor has a known dtype, a shape of at most 64 non-negative integers whose element
  count (zero dimensions aside) fits in 63 bits, and ``data_offsets`` [start, end) whose
  length is exactly what dtype and shape need and which lie inside the file (a truncated
  file is caught here); no two tensors share a byte.
* checkpoint directories (``read_checkpoint_dir``): every file read (``config.json``,
  ``model.safetensors``, the index and each shard it names) must resolve, symlinks
  included, to a regular file inside the checkpoint directory. Absolute shard names and
  names with a ``..`` component are refused, so an index cannot make the importer read
  arbitrary files. The one exception is the Hugging Face hub cache layout, whose
  ``<repo>/snapshots/<revision>/`` files are symlinks into the same repository's
  ``blobs/``: a file may resolve into ``<repo>/blobs`` when that is a real directory (not
  a symlink) beside ``snapshots``. Every shard the index names must be a file before any
  is read; the index must map every tensor to the shard that holds it and each shard may
  hold only the tensors mapped to it. Weights must be floating point (F64, F32, F16, BF16): integer
  or boolean tensors would convert to whole numbers without complaint.

Only numpy, ml_dtypes and the standard library are used; tensors are memory-mapped.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
# dtypes a weight may have: the rest hold whole numbers that would convert silently.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
FLOAT_NUMPY_DTYPES = frozenset(np.dtype(SAFETENSORS_DTYPES[d]) for d in FLOAT_DTYPES)
_DTYPE_NAMES = {np.dtype(t): name for name, t in SAFETENSORS_DTYPES.items()}

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class _DuplicateKey(ValueError):
  pass


def _no_duplicates(pairs):
  out = {}
  for key, value in pairs:
    if key in out:
      raise _DuplicateKey(f"name {key!r} appears twice")
    out[key] = value
  return out


def _parse_json(raw: bytes, path: str, what: str) -> Any:
  try:
    return json.loads(raw, object_pairs_hook=_no_duplicates)
  except _DuplicateKey as e:
    raise ValueError(f"{path}: {what}: {e}") from None
  # ValueError covers bad JSON and bad UTF-8; RecursionError very deep nesting.
  except (ValueError, RecursionError) as e:
    raise ValueError(f"{path}: {what} is not valid JSON ({type(e).__name__}: {e})") from None


def brief(value, limit: int = 80) -> str:
  """repr of ``value``, cut to ``limit`` characters (error messages stay one short line)."""
  try:
    text = repr(value)
  except ValueError:  # an integer of more digits than Python will print
    text = f"<{type(value).__name__} too large to show>"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(path: str, limit: int = 200) -> str:
  """``path`` for a message: a long one (an index may name a file thousands of characters
  deep) keeps its start and its file name, with the middle cut out."""
  if len(path) <= limit:
    return path
  tail = limit * 2 // 3
  return path[:limit - tail - 3] + "..." + path[-tail:]


def _kind(value) -> str:
  return {dict: "an object", list: "a list", str: "a string", type(None): "null",
          bool: "a boolean"}.get(type(value), "a number")


def read_json_object(path: str, what: str = "file") -> dict:
  """A JSON file that must hold an object (``what`` names it in errors)."""
  with open(path, "rb") as f:
    value = _parse_json(f.read(), path, what)
  if not isinstance(value, dict):
    raise ValueError(f"{path}: {what} must be a JSON object, got {_kind(value)}")
  return value


# -- safetensors --------------------------------------------------------------------------

def _header(path: str) -> tuple[dict, int, int]:
  """(header, offset of the data section, size of the data section) of a safetensors file."""
  where = shown(path)
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f"{where}: {size} bytes, too short for a safetensors file (an 8-byte "
                       "header length comes first)")
    header_len = int.from_bytes(prefix, "little")
    if header_len > size - 8:
      raise ValueError(f"{where}: safetensors header length {header_len} exceeds the file "
                       f"size ({size} bytes): not a safetensors file, or truncated")
    raw = f.read(header_len)
  header = _parse_json(raw, where, "safetensors header")
  if not isinstance(header, dict):
    raise ValueError(f"{where}: safetensors header must be a JSON object, got {_kind(header)}")
  return header, 8 + header_len, size - 8 - header_len


def _is_index(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# numpy's limit on dimensions (numpy 1 allowed 32; arrays beyond it are caught when read).
MAX_RANK = 64
# Bytes a numpy array may span: its byte strides and size are signed 64-bit integers.
_MAX_BYTES = 2**63 - 1


def _entry(path: str, name: str, info, data_len: int) -> tuple[str, tuple, int, int]:
  """(dtype, shape, start, end) of one header entry, checked against the data section."""
  where = f"{path}: tensor {brief(name, 100)}"
  if not isinstance(info, dict):
    raise ValueError(f"{where}: header entry must be an object, got {_kind(info)}")
  dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
  if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
    raise ValueError(f"{where} has unsupported dtype {brief(dtype)} (readable: "
                     f"{', '.join(SAFETENSORS_DTYPES)})")
  if not isinstance(shape, list) or not all(_is_index(n) for n in shape):
    raise ValueError(f"{where}: shape must be a list of non-negative integers, got {brief(shape)}")
  if len(shape) > MAX_RANK:
    raise ValueError(f"{where}: shape has {len(shape)} dimensions, at most {MAX_RANK} can be "
                     "read")
  itemsize = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
  # numpy refuses a shape whose non-zero dimensions overflow even when one dimension is 0,
  # so the bound ignores zeros; it also keeps math.prod below from growing without limit.
  span = itemsize
  for n in shape:
    span *= max(n, 1)
    if span > _MAX_BYTES:
      raise ValueError(f"{where}: shape {brief(shape)} is too large for an array (its non-zero "
                       f"dimensions times {itemsize} bytes exceed 2**63 - 1)")
  if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_index, offsets))
      or offsets[0] > offsets[1]):
    raise ValueError(f"{where}: data_offsets must be two integers 0 <= start <= end, "
                     f"got {brief(offsets)}")
  start, end = offsets
  if end > data_len:
    raise ValueError(f"{where}: data_offsets [{start}, {end}] run past the end of the data "
                     f"({data_len} bytes): the file is truncated or its header is wrong")
  need = math.prod(shape) * itemsize
  if end - start != need:
    raise ValueError(f"{where}: data_offsets [{start}, {end}] hold {end - start} bytes, but "
                     f"{dtype} of shape {brief(shape)} needs {need}")
  return dtype, tuple(shape), start, end


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of one safetensors file as numpy arrays (bfloat16 via ml_dtypes), memory-mapped.

  The header is validated against the file first (module docstring); any inconsistency is
  a ValueError naming the file.
  """
  header, data_start, data_len = _header(path)
  where = shown(path)
  metadata = header.pop("__metadata__", {})
  if not isinstance(metadata, dict):
    raise ValueError(f"{where}: __metadata__ must be an object, got {_kind(metadata)}")
  entries = {name: _entry(where, name, info, data_len) for name, info in header.items()}
  spans = sorted((start, end, name) for name, (_, _, start, end) in entries.items()
                 if end > start)
  for (_, end0, name0), (start1, _, name1) in zip(spans, spans[1:]):
    if start1 < end0:
      raise ValueError(f"{where}: tensors {brief(name0, 100)} and {brief(name1, 100)} share "
                       f"bytes (data_offsets {list(entries[name0][2:])} and "
                       f"{list(entries[name1][2:])} overlap)")
  if data_len:
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
  else:  # numpy cannot map zero bytes
    data = np.zeros(0, np.uint8)
  tensors = {}
  for name, (dtype, shape, start, end) in entries.items():
    try:
      tensors[name] = data[start:end].view(SAFETENSORS_DTYPES[dtype]).reshape(shape)
    # numpy's own limits, should the checks above miss one: still name the file and tensor
    except (ValueError, TypeError, MemoryError) as e:
      raise ValueError(f"{where}: tensor {brief(name, 100)} ({dtype}, shape "
                       f"{brief(list(shape))}) cannot be read ({type(e).__name__}: {e})") from None
  return tensors


# -- checkpoint directories ---------------------------------------------------------------

def _roots(directory: str) -> list[str]:
  """Real directories a checkpoint's files may resolve into."""
  root = os.path.realpath(directory)
  roots = [root]
  snapshots = os.path.dirname(root)
  # Hugging Face hub cache: <repo>/snapshots/<revision>/<file> -> ../../blobs/<hash>. root
  # is real, so <repo> is; a blobs/ that is itself a symlink could lead anywhere (to /, say)
  # and does not count.
  if os.path.basename(snapshots) == "snapshots":
    blobs = os.path.join(os.path.dirname(snapshots), "blobs")
    if os.path.isdir(blobs) and not os.path.islink(blobs):
      roots.append(blobs)
  return roots


def _inside(path: str, roots: list[str]) -> bool:
  real = os.path.realpath(path)
  return any(os.path.commonpath([real, root]) == root for root in roots)


def _checked_file(directory: str, name: str, roots: list[str]) -> str:
  """``directory/name`` when it resolves to a file inside the checkpoint directory."""
  path = os.path.join(directory, name)
  if not _inside(path, roots):
    raise ValueError(f"{shown(path)}: resolves to {shown(os.path.realpath(path))}, outside the "
                     f"checkpoint directory {shown(roots[0])}")
  return path


def _float_weights(path: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  for name, array in tensors.items():
    if array.dtype not in FLOAT_NUMPY_DTYPES:
      raise ValueError(f"{shown(path)}: tensor {brief(name, 100)} is stored as "
                       f"{_DTYPE_NAMES[array.dtype]}; weights must be floating point "
                       f"({', '.join(FLOAT_DTYPES)})")
  return tensors


def _read_shards(path: str, roots: list[str]) -> dict[str, np.ndarray]:
  """Tensors of the shards listed in ``path/model.safetensors.index.json``."""
  index_path = _checked_file(path, INDEX_NAME, roots)
  weight_map = read_json_object(index_path, "index").get("weight_map")
  if not isinstance(weight_map, dict):
    raise ValueError(f"{index_path}: weight_map must be an object mapping tensor names to "
                     f"shard files, got {_kind(weight_map)}")
  if not weight_map:
    raise ValueError(f"{index_path}: weight_map lists no tensors")
  index_shown = shown(index_path)
  by_shard: dict[str, set] = {}
  for tensor, shard in weight_map.items():
    entry = f"{index_shown}: weight_map entry {brief(tensor, 100)}: {brief(shard, 200)}"
    if not isinstance(shard, str) or not shard or "\0" in shard:
      raise ValueError(f"{entry} is not a shard file name")
    if os.path.isabs(shard):
      raise ValueError(f"{entry} is an absolute path; shards must lie in the checkpoint "
                       "directory")
    # '..' is refused by name, not by where it leads: through a symlinked folder it climbs
    # out of the folder's target, which a lexical check would not see.
    climbs = ".." in shard.split(os.sep)
    if climbs or not _inside(os.path.join(path, shard), roots):
      raise ValueError(f"{entry} lies outside the checkpoint directory {shown(roots[0])}"
                       + (" ('..' is not allowed in shard names)" if climbs else ""))
    by_shard.setdefault(shard, set()).add(tensor)
  # Every shard must be a file before any is read: otherwise a missing or odd shard shows
  # up as another shard holding "its" tensors.
  for shard in sorted(by_shard):
    shard_path = os.path.join(path, shard)
    if not os.path.isfile(shard_path):
      problem = ("is a directory, not a file" if os.path.isdir(shard_path) else
                 "is not a regular file" if os.path.exists(shard_path) else "does not exist")
      raise ValueError(f"{index_shown}: shard {brief(shard, 200)} (holding e.g. "
                       f"{brief(min(by_shard[shard]), 100)}) {problem}")
  tensors = {}
  for shard in sorted(by_shard):
    shard_path = os.path.join(path, shard)
    found = _float_weights(shard_path, read_safetensors(shard_path))
    for name in sorted(set(found) - by_shard[shard]):
      other = weight_map.get(name)
      raise ValueError(f"{shown(shard_path)}: holds tensor {brief(name, 100)}, which "
                       f"{INDEX_NAME} " + (f"maps to {brief(other, 200)}" if other else
                                           "does not list"))
    for name in sorted(by_shard[shard] - set(found)):
      raise ValueError(f"{index_shown}: weight_map puts tensor {brief(name, 100)} in "
                       f"{brief(shard, 200)}, which does not hold it")
    tensors.update(found)
  return tensors


def read_checkpoint_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, tensors) of a Hugging Face checkpoint directory.

  Reads ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``,
  checked as the module docstring says. Raises ValueError naming the file at fault.
  """
  if not os.path.isdir(path):
    raise ValueError(f"{path}: " + ("not a directory" if os.path.exists(path) else
                                    "no such directory")
                     + " (expected a Hugging Face checkpoint directory)")
  roots = _roots(path)
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise ValueError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
  config = read_json_object(_checked_file(path, CONFIG_NAME, roots), "config")
  single = os.path.join(path, SINGLE_NAME)
  if os.path.isfile(single):
    single = _checked_file(path, SINGLE_NAME, roots)
    return config, _float_weights(single, read_safetensors(single))
  if os.path.isfile(os.path.join(path, INDEX_NAME)):
    return config, _read_shards(path, roots)
  raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json "
                   "(only safetensors checkpoints can be read)")

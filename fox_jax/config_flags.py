"""``--config.<field>=<value>`` flags: a value parsed as the field's type, every field of
``fox_jax.config.ModelConfig`` included (``--config.model.overrides.num_kv_heads=2``, also
when the config file does not set it), and a misspelt field named with the closest one.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import typing
from typing import Any, Optional, Sequence

import ml_collections

from fox_jax.errors import UsageError
from fox_jax.run_config import _model_field_types, _unknown


def _nested_field_types(tp) -> Optional[dict[str, Any]]:
  """Field types of a dataclass-valued model field (BlockSizes, Pruning), else None."""
  for arg in typing.get_args(tp) or (tp,):
    if dataclasses.is_dataclass(arg):
      hints = typing.get_type_hints(arg)
      return {f.name: hints[f.name] for f in dataclasses.fields(arg)}
  return None


def _parse_typed(text: str, tp, key: str):
  """``text`` as a value of annotation ``tp`` (int, float, bool, str, Optional / Union)."""
  args = typing.get_args(tp)
  if typing.get_origin(tp) is typing.Union:
    if type(None) in args and text.strip().lower() in ("none", "null"):
      return None
    errors = []
    # Numbers before strings: a str member would take "5.0" as text.
    order = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
    for arg in order:
      try:
        return _parse_typed(text, arg, key)
      except UsageError as e:
        errors.append(str(e))
    raise UsageError(errors[0] if errors else f"--config.{key}: cannot parse {text!r}")
  if tp is bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise UsageError(f"--config.{key} takes true or false, got {text!r}")
  if tp is int:
    try:
      return int(text)
    except ValueError:
      pass
    try:
      value = float(text)
    except ValueError:
      value = math.nan
    if math.isfinite(value) and value.is_integer():  # e.g. total_tokens=2.5e9
      return int(value)
    raise UsageError(f"--config.{key} takes an int, got {text!r}")
  if tp is float:
    try:
      return float(text)
    except ValueError:
      raise UsageError(f"--config.{key} takes a number, got {text!r}") from None
  if tp is str:
    return text
  if dataclasses.is_dataclass(tp) or tp in (tuple, list, dict):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise UsageError(f"--config.{key} takes a Python literal, got {text!r}") from None
    if tp in (tuple, list):
      if isinstance(value, (int, float)):
        value = (value,)
      if not isinstance(value, (tuple, list)):
        raise UsageError(f"--config.{key} takes a tuple, got {text!r}")
      return tp(value)
    expected = dict if dataclasses.is_dataclass(tp) else tp
    if not isinstance(value, expected):
      raise UsageError(f"--config.{key} takes a {expected.__name__}, got {text!r}")
    return value
  raise UsageError(f"--config.{key}: cannot parse {text!r}")


def _type_of(value):
  if isinstance(value, bool):
    return bool
  for tp in (int, float, str, tuple, list):
    if isinstance(value, tp):
      return tp
  return None


def _flat_keys(c, prefix="") -> list[str]:
  keys = []
  for name, value in c.items():
    key = f"{prefix}{name}"
    keys.append(key)
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      keys += _flat_keys(value, key + ".")
  return keys


def _set_model_override(c, parts: list[str], text: str) -> None:
  key = ".".join(parts)
  fields = _model_field_types()
  name = parts[2]
  if name not in fields:
    raise _unknown(key, [f"model.overrides.{f}" for f in fields])
  overrides = c.model.overrides.to_dict() if c.model.get("overrides") else {}
  tp = fields[name]
  if len(parts) == 3:
    value = _parse_typed(text, tp, key)
  elif len(parts) == 4 and _nested_field_types(tp) is not None:
    sub = _nested_field_types(tp)
    if parts[3] not in sub:
      raise _unknown(key, [f"model.overrides.{name}.{f}" for f in sub])
    value = dict(overrides.get(name) or {})
    value[parts[3]] = _parse_typed(text, sub[parts[3]], key)
  else:
    raise _unknown(key, [f"model.overrides.{f}" for f in fields])
  overrides[name] = value
  c.model.overrides = ml_collections.ConfigDict(overrides)


def apply_overrides(c: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> None:
  """Sets each ``(dotted key, text)``; the text is parsed as the field's type.

  ``model.overrides.<field>`` accepts every ModelConfig field (typed by its annotation),
  and ``model.overrides.block_sizes.<f>`` / ``pruning.<f>`` their sub-fields; elsewhere the
  key must exist in the config. Unknown keys get a suggestion.
  """
  for key, text in overrides:
    parts = key.split(".")
    if len(parts) >= 3 and parts[:2] == ["model", "overrides"]:
      _set_model_override(c, parts, text)
      continue
    node = c
    for i, part in enumerate(parts):
      is_leaf = i == len(parts) - 1
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise _unknown(key, _flat_keys(c))
      if is_leaf:
        current = node[part]
        if isinstance(current, ml_collections.ConfigDict):
          raise UsageError(f"--config.{key} is a block; set its fields, e.g. "
                           f"--config.{key}.{next(iter(current.keys()), 'x')}=...")
        tp = _type_of(current)
        value = _parse_typed(text, tp, key) if tp else _parse_literal(text)
        node[part] = value
      else:
        node = node[part]


def _parse_literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text

"""What a compiled program sends between devices, read from its optimised HLO.

``collective_traffic(compiled.as_text(), num_shards)`` walks the HLO's computations from the
entry, multiplies what a while loop's body sends by the loop's known trip count (XLA
annotates ``known_trip_count`` on counted loops such as ``lax.scan``), and adds up the
collectives each device executes: collective-permutes (the ring's transfers), all-to-alls
(Ulysses) and all-gathers. Bytes are what one device puts on the wire: a permute's whole
operand, (P - 1) / P of an all-to-all's and of an all-gather's result. Both branches of a
conditional are counted (an upper bound for the truncated ring). Works for the CPU, GPU and
TPU compilers' text (synchronous and ``-start`` asynchronous forms).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_KINDS = {"collective-permute": "permute", "all-to-all": "all_to_all",
          "all-gather": "all_gather"}
_OP = re.compile(r"=\s*(.*?)\s+(collective-permute|all-to-all|all-gather)(?:-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_CALLEES = re.compile(r"\b(body|calls|to_apply|branch_computations|true_computation|"
                      r"false_computation)=\{?([^,}]+(?:,\s*%[\w.\-]+)*)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


class Traffic(NamedTuple):
  count: int  # collectives executed per device
  bytes: float  # bytes one device sends
  shapes: dict  # result type -> executions


def _result_bytes(types: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(types):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def _computations(text: str) -> dict:
  comps, name, entry = {}, None, None
  for line in text.splitlines():
    if name is None:
      m = _HEADER.match(line)
      if m and "=" not in line.split("(")[0]:
        name = m.group(1)
        comps[name] = []
        if line.startswith("ENTRY"):
          entry = name
    elif line.strip() == "}":
      name = None
    else:
      comps[name].append(line)
  return comps, entry


def collective_traffic(hlo_text: str, num_shards: int) -> dict:
  """{"permute" | "all_to_all" | "all_gather": Traffic} executed by one device."""
  comps, entry = _computations(hlo_text)
  own = {c: [] for c in comps}  # (kind, result type, bytes)
  calls = {c: [] for c in comps}  # (callee, multiplier)
  for c, lines in comps.items():
    for line in lines:
      m = _OP.search(line)
      if m:
        kind = _KINDS[m.group(2)]
        b = _result_bytes(m.group(1))
        if kind != "permute":
          b = b * (num_shards - 1) / num_shards
        own[c].append((kind, m.group(1).split("{")[0], b))
      trip = _TRIP.search(line)
      for key, names in _CALLEES.findall(line):
        for callee in re.findall(r"%?([\w.\-]+)", names):
          if callee in comps:
            calls[c].append((callee, int(trip.group(1)) if key == "body" and trip else 1))

  totals = defaultdict(lambda: [0, 0.0, defaultdict(int)])

  def walk(c, mult, depth=0):
    if depth > 64:
      raise ValueError("HLO call graph too deep (a cycle?)")
    for kind, shape, b in own[c]:
      t = totals[kind]
      t[0] += mult
      t[1] += mult * b
      t[2][shape] += mult
    for callee, m in calls[c]:
      walk(callee, mult * m, depth + 1)

  walk(entry, 1)
  return {k: Traffic(v[0], v[1], dict(v[2])) for k, v in totals.items()}

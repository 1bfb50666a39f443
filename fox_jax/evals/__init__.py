"""Evaluations behind one registry: ``EVALS[name]`` is a module with ``Options``,
``run(model, tokenizer, options, **adapters) -> dict`` and ``plot(result, path)``
(see ``fox_jax.evals.common``); :func:`write` saves a result as ``<name>.json|png``.

  per_token_loss   loss against position over held-out documents, past the training length
  needle           needle in a haystack: greedy retrieval, exact match (lengths x depths)
  passkey          passkey retrieval: greedy digits, exact match (lengths x depths)
  mqar             multi-query associative recall (standard or last value wins): accuracy
                   at the answers, teacher-forced (lengths x key-value pairs)

A module may also have ``run_defaults(config) -> dict``: the options a run directory trained
with ``config`` is evaluated with unless told otherwise (``mqar``: the task it trained on).

Adding an evaluation: one module with those three names, and one line below.
``fox_jax.evaluate`` runs them on run directories, ``fox-eval --task NAME`` from the shell.
"""

from __future__ import annotations

import json
import os

from fox_jax.errors import UsageError
from fox_jax.evals import harness, mqar, needle, passkey, per_token_loss

EVALS = {
    "per_token_loss": per_token_loss,
    "needle": needle,
    "passkey": passkey,
    "mqar": mqar,
    "lm_eval": harness,  # lm-evaluation-harness tasks; needs the lm-eval extra
}


def get(name: str):
  """The evaluation module registered as ``name``; a UsageError naming the others."""
  try:
    return EVALS[name]
  except KeyError:
    raise UsageError(f"unknown evaluation {name!r} (registered: {', '.join(EVALS)})") from None


def write(name: str, result: dict, out_dir: str) -> tuple[str, str]:
  """``<out_dir>/<name>.json`` and ``<out_dir>/<name>.png`` of a result; their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path, png_path = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "png"))
  with open(json_path, "w") as f:
    json.dump(result, f, indent=1)
  get(name).plot(result, png_path)
  return json_path, png_path

"""Needle in a haystack, FoX (Pro) against the Transformer (Pro), easy and standard modes (the
FoX paper's needle figure).

  python experiments/paper/needle.py [--seeds 1] [--scale cpu|smoke|gpu] [--data_path P]

Writes runs/paper/needle.{json,md,png}. The runs are the ladder's (trained here if absent);
each is scored by fox-eval's ``needle`` task (``fox_jax/evals/needle.py``: 11 lengths from
T/8 to 4T x 11 depths, the authors' completion query, greedy cached decoding, exact match
instead of their GPT-4o judge, the needle in the corpus's own form on the built-in corpus).

RESULTS, recorded on this machine (command; date; machine; JAX; commit):

`python experiments/paper/needle.py`; 2026-11-29; x86_64, 2 CPU cores, 1 x cpu (cpu); JAX 0.10.2; commit 0d6a107

| model | easy (exact match) | standard (exact match) |
|---|---|---|
| FoX (Pro) | 0.000 | 0.000 |
| Transformer (Pro) | 0.000 | 0.000 |

Mean accuracy over the grid: 11 lengths (262-1024 tokens) x 11 depths; training length 256; 1 seed(s).

Both models score 0 in every cell: after the query ``assert BEST_THING == "`` they continue
with ``')`` and indentation, the commonest continuation of a string in Python source, not the
needle. A 1.2M-parameter byte model trained on 400k tokens does not learn to retrieve; the
paper's heat maps come from 760M models trained on 48G tokens. The same grid runs at 125M in
gpu_scale.py.
"""

from __future__ import annotations

import os

import numpy as np

import common

MODELS = ("fox_pro", "transformer_pro")
NAMES = {"fox_pro": "FoX (Pro)", "transformer_pro": "Transformer (Pro)"}


def options(exp) -> dict:
  if exp.scale == "smoke":  # 2 lengths x 2 depths
    return {"lengths": (240, 256), "depths": (0.0, 100.0)}
  return {}


def main(argv=None) -> dict:
  args = common.parser(__doc__, seeds=1).parse_args(argv)
  exp = common.Experiment.from_args("needle", args)
  from fox_jax import evaluate
  results = {}
  for family in MODELS:
    for seed in exp.seeds:
      run = common.train(exp, family, common.run_config(exp, family, seed))
      out = os.path.join(run["workdir"], "eval")
      results[(family, seed)] = evaluate.run_task("needle", run["workdir"], out=out,
                                                  **options(exp))
  modes = next(iter(results.values()))["options"]["modes"]
  rows = []
  for family in MODELS:
    row = [NAMES[family]]
    for mode in modes:
      row.append(common.mean_spread([results[(family, s)]["accuracy"][mode] for s in exp.seeds],
                                    3))
    rows.append(row)
  first = next(iter(results.values()))
  md = common.markdown_table(["model", *[f"{m} (exact match)" for m in modes]], rows) + (
      f"\n\nMean accuracy over the grid: {len(first['lengths'])} lengths "
      f"({first['lengths'][0]}-{first['lengths'][-1]} tokens) x {len(first['depths'])} depths; "
      f"training length {exp.train_length}; {len(exp.seeds)} seed(s).")

  plt = common.pyplot()
  fig, axes = plt.subplots(len(MODELS), len(modes), figsize=(6 * len(modes), 4.2 * len(MODELS)),
                           squeeze=False)
  for i, family in enumerate(MODELS):
    for j, mode in enumerate(modes):
      grid = np.mean([results[(family, s)]["grid"][mode] for s in exp.seeds], axis=0)
      r = results[(family, exp.seeds[0])]
      ax = axes[i, j]
      im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
      ax.set_xticks(range(len(r["lengths"])), r["lengths"], rotation=45)
      ax.set_yticks(range(len(r["depths"])), [f"{d:g}" for d in r["depths"]])
      ax.set(xlabel="context length (tokens)", ylabel="depth (%)",
             title=f"{NAMES[family]}, {mode}: {np.mean(grid):.2f}")
  fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="exact match")
  common.write(exp, {"train_length": exp.train_length,
                     "results": [{"family": f, "seed": s, **r}
                                 for (f, s), r in results.items()]}, md, fig, argv)
  return results


if __name__ == "__main__":
  common.cli(main)

"""Multi-query associative recall, FoX (Pro) against the Transformer (Pro): accuracy against
sequence length and key-value pairs, for Zoology's MQAR and its last-value-wins variant
(keys are reassigned later in the sequence; the latest value is the answer).

  python experiments/paper/mqar.py [--seeds 1] [--scale cpu|smoke|gpu]

Writes runs/paper/mqar.{json,md,png}. Each (model, variant) is trained on its task with
experiments/configs/cpu_mqar.py (2 layers, d_model 64, vocabulary 64, 4 pairs in 64-token
rows, 600 steps of 32 rows) and scored by fox-eval's ``mqar`` task (teacher-forced argmax
at the answer positions) on fresh examples at 1x, 2x and 4x the training length with half,
once and twice the trained pairs. Reduced from Zoology's protocol (vocabulary 8192,
(seq, pairs) up to (256, 16), 64 epochs of 100k examples, a learning-rate sweep) to fit 2
CPU cores: one learning rate, 20k examples, lengths past the training one.

RESULTS: not yet recorded.
"""

from __future__ import annotations

import os

import numpy as np

import common

MODELS = ("fox_pro", "transformer_pro")
NAMES = {"fox_pro": "FoX (Pro)", "transformer_pro": "Transformer (Pro)"}
VARIANTS = ("standard", "last_value")


def main(argv=None) -> dict:
  args = common.parser(__doc__, seeds=1).parse_args(argv)
  exp = common.Experiment.from_args("mqar", args)
  from fox_jax import evaluate
  results = {}
  for variant in VARIANTS:
    for family in MODELS:
      for seed in exp.seeds:
        c = common.run_config(exp, family, seed, recipe="mqar")
        c.data.mqar_variant = variant
        run = common.train(exp, f"mqar-{variant}-{family}", c)
        kv = int(c.data.mqar_num_kv_pairs)
        r = evaluate.run_task("mqar", run["workdir"], out=os.path.join(run["workdir"], "eval"),
                              lengths=("1x", "2x", "4x"),
                              num_kv_pairs=tuple(sorted({max(1, kv // 2), kv, 2 * kv})))
        results[(variant, family, seed)] = {"val_loss": run["val_loss"], **r}
  first = next(iter(results.values()))
  Ls, Ks = first["lengths"], first["num_kv_pairs"]
  cells = [(i, j) for j in range(len(Ks)) for i in range(len(Ls)) if first["grid"][j][i] is not None]
  header = ["variant", "model", *[f"T={Ls[i]}, {Ks[j]} pairs" for i, j in cells], "mean"]
  rows = []
  for variant in VARIANTS:
    for family in MODELS:
      grids = [results[(variant, family, s)]["grid"] for s in exp.seeds]
      rows.append([variant, NAMES[family],
                   *[common.mean_spread([g[j][i] for g in grids], 3) for i, j in cells],
                   common.mean_spread([results[(variant, family, s)]["accuracy"]
                                       for s in exp.seeds], 3)])
  md = common.markdown_table(header, rows) + (
      f"\n\nAccuracy at the answer positions (chance {first['chance']:.3f}); trained at "
      f"{first['options']['train_length']} tokens with the middle number of pairs (the other "
      f"cells test what was not trained); {len(exp.seeds)} seed(s), "
      f"{first['options']['num_examples']} test examples per cell.")

  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(VARIANTS), figsize=(6 * len(VARIANTS), 4), sharey=True)
  for ax, variant in zip(axes, VARIANTS):
    for family, ls in zip(MODELS, ("-", "--")):
      for j, k in enumerate(Ks):
        acc = [np.mean([results[(variant, family, s)]["grid"][j][i] for s in exp.seeds])
               if first["grid"][j][i] is not None else np.nan for i in range(len(Ls))]
        ax.plot(Ls, acc, ls, marker="o", label=f"{NAMES[family]}, {k} pairs")
    common.log_lengths_axis(ax, Ls)
    ax.set(xlabel="sequence length", title=f"MQAR, {variant}", ylim=(0, 1.02))
  axes[0].set_ylabel("accuracy")
  axes[0].legend(fontsize=8)
  common.write(exp, {"results": [{"variant": v, "family": f, "seed": s, **r}
                                 for (v, f, s), r in results.items()]}, md, fig, argv)
  return results


if __name__ == "__main__":
  common.cli(main)

"""The forget-gate ablation: full (data-dependent), bias-only (a learned per-head bias),
fixed (a constant per-head decay) and none (the Transformer), each with and without RoPE, on
the LLaMA block (the FoX paper's ablation table).

  python experiments/paper/gate_ablation.py [--seeds 3] [--scale cpu|smoke|gpu] [--data_path P]

Writes runs/paper/gate_ablation.{json,md,png}. The cells "full, no RoPE" and "none, RoPE" are
FoX (LLaMA) and Transformer (LLaMA) and share the ladder's runs. bias-only and fixed start
from per-head decay times log-spaced in [1, T] (T the training length; ``fox_jax.attention
.decay_time_bias``), so that heads range from one-token to whole-context memory; the bias is
learned for bias-only and kept for fixed, and neither gets weight decay.

RESULTS, recorded on this machine (command; date; machine; JAX; commit):

`python experiments/paper/gate_ablation.py`; 2026-11-29; x86_64, 2 CPU cores, 1 x cpu (cpu); JAX 0.10.2; commit 3ae5062

| forget gate | val loss, no RoPE | loss 257-1024, no RoPE | val loss, RoPE | loss 257-1024, RoPE |
|---|---|---|---|---|
| full (data-dependent) | 2.1939 ± 0.0224 | 2.392 ± 0.016 | 2.1765 ± 0.0119 | 2.371 ± 0.018 |
| bias-only | 2.3278 ± 0.0322 | 2.543 ± 0.060 | 2.3151 ± 0.0370 | 2.522 ± 0.061 |
| fixed | 2.3265 ± 0.0289 | 2.540 ± 0.056 | 2.3124 ± 0.0390 | 2.515 ± 0.057 |
| none | 2.7048 ± 0.0294 | 2.957 ± 0.031 | 2.6114 ± 0.0262 | 2.914 ± 0.023 |

LLaMA block; loss in nats per token; mean ± standard deviation over 3 seed(s); val loss on the first 256 packed held-out rows (the same for every run); trained at 256, evaluated to 1024 on held-out documents read from their start.

A data-dependent gate beats a learned per-head bias or a fixed decay (which tie) by 0.13 to
0.14, four or more deviations, and those beat no gate by 0.3 to 0.38, with and without RoPE.
RoPE changes nothing beyond the noise for a gated model (0.013 to 0.017, deviations 0.01 to
0.04) and helps the Transformer (0.094, three deviations), as in the paper (there far more:
perplexity 29.30 without RoPE, 7.49 with).
"""

from __future__ import annotations

import common
import ladder

GATES = ("full", "bias_only", "fixed", "none")
GATE_NAMES = {"full": "full (data-dependent)", "bias_only": "bias-only", "fixed": "fixed",
              "none": "none"}


def cell(exp, gate: str, rope: bool) -> tuple[str, dict]:
  """(family, model overrides) of a cell; the LLaMA presets where a cell is one."""
  if gate == "full" and not rope:
    return "fox_llama", {}
  if gate == "none" and rope:
    return "transformer_llama", {}
  overrides = {"forget_gate": gate, "rope": rope}
  if gate in ("bias_only", "fixed"):
    overrides.update(decay_time_min=1.0, decay_time_max=float(exp.train_length))
  return "fox_llama", overrides


def main(argv=None) -> dict:
  args = common.parser(__doc__, seeds=3).parse_args(argv)
  exp = common.Experiment.from_args("gate_ablation", args)
  T = exp.train_length
  results = {}
  for gate in GATES:
    for rope in (False, True):
      family, overrides = cell(exp, gate, rope)
      results[f"{gate}/{'rope' if rope else 'no_rope'}"] = ladder.run_family(exp, family,
                                                                               **overrides)
  top = len(next(iter(results.values()))["runs"][0]["loss"])
  rows = []
  for gate in GATES:
    row = [GATE_NAMES[gate]]
    for rope in (False, True):
      r = results[f"{gate}/{'rope' if rope else 'no_rope'}"]["runs"]
      row.append(common.mean_spread([x["val_loss"] for x in r]))
      beyond = [x["beyond_T"] for x in r]
      row.append(common.mean_spread(beyond, 3) if None not in beyond else "-")
    rows.append(row)
  header = ["forget gate", "val loss, no RoPE", f"loss {T + 1}-{top}, no RoPE",
            "val loss, RoPE", f"loss {T + 1}-{top}, RoPE"]
  md = common.markdown_table(header, rows) + (
      f"\n\nLLaMA block; loss in nats per token; mean ± standard deviation over "
      f"{len(exp.seeds)} seed(s); val loss on the first {exp.val_rows} packed held-out rows "
      f"(the same for every run); trained at {T}, evaluated to {top} on held-out documents "
      f"read from their start.")

  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  for ax, rope in zip(axes, (False, True)):
    for gate in GATES:
      common.plot_mean_curve(ax, results[f"{gate}/{'rope' if rope else 'no_rope'}"]["runs"],
                             GATE_NAMES[gate])
    ax.axvline(T, color="gray", ls="--", lw=1)
    ax.set_title(f"{'with' if rope else 'without'} RoPE")
    ax.set_xlabel("position")
  axes[0].set_ylabel("loss (nats, centred moving average of 21)")
  axes[0].legend()
  common.write(exp, {"train_length": T, "cells": results}, md, fig, argv)
  return results


if __name__ == "__main__":
  common.cli(main)

"""The model ladder: Transformer (LLaMA), Transformer (Pro), FoX (LLaMA), FoX (Pro) at equal
size and tokens; validation loss, loss against position, and extrapolation to 4x the
training length (the FoX paper's model table and its per-token-loss figure).

  python experiments/paper/ladder.py [--seeds 3] [--scale cpu|smoke|gpu] [--data_path P]
      [--families transformer_llama,transformer_pro,fox_llama,fox_pro]

Writes runs/paper/ladder.{json,md,png}. Each family is trained with --seeds seeds (init and
data order) on the main command's model (4 layers, d_model 128, byte vocabulary, 256-token
rows), half its tokens; the loss against position is fox-eval's per_token_loss up to 4x.

RESULTS: not yet recorded.
"""

from __future__ import annotations

import numpy as np

import common

NAMES = {"transformer_llama": "Transformer (LLaMA)", "transformer_pro": "Transformer (Pro)",
         "fox_llama": "FoX (LLaMA)", "fox_pro": "FoX (Pro)"}


def bands(T: int) -> list[tuple[int, int]]:
  """Position bands (1-based, inclusive): the first 32 tokens, the training length's last
  eighth, and the last quarter of 4x (3T..4T, the furthest extrapolation)."""
  return [(1, 32), (T - T // 8 + 1, T), (3 * T + 1, 4 * T)]


def run_family(exp, family: str, **overrides) -> dict:
  """Trains and evaluates ``family`` at every seed: per seed, its val loss, curve, bands."""
  T = exp.train_length
  runs = []
  for seed in exp.seeds:
    c = common.run_config(exp, family, seed, **overrides)
    label = family + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
    run = common.train(exp, label, c)
    curve = common.per_token_loss(run["workdir"])
    losses = curve["loss_by_position"]
    top = min(len(losses), 4 * T)
    b = [bb for bb in bands(T) if bb[1] <= top]
    runs.append({"seed": seed, "workdir": run["workdir"], "val_loss": run["val_loss"],
                 "loss": losses[:top], "bands": dict(zip(map(str, b), common.band_means(losses, b))),
                 "beyond_T": float(np.mean(losses[T:top])) if top > T else None})
  params, non_embedding = common.param_count(c)
  return {"family": family, "overrides": overrides, "params": params,
          "non_embedding_params": non_embedding, "runs": runs}


def main(argv=None) -> dict:
  p = common.parser(__doc__, seeds=3)
  p.add_argument("--families", default=",".join(common.FAMILIES),
                 help="comma-separated subset of " + ", ".join(common.FAMILIES))
  args = p.parse_args(argv)
  exp = common.Experiment.from_args("ladder", args)
  families = [f for f in args.families.split(",") if f]
  bad = [f for f in families if f not in common.FAMILIES]
  if bad or not families:
    p.error(f"--families: unknown {bad} (choose from {', '.join(common.FAMILIES)})")
  T = exp.train_length
  results = [run_family(exp, f) for f in families]
  header = ["model", "params (non-emb.)", "val loss", *[f"loss @ {lo}-{hi}" for lo, hi in bands(T)],
            f"mean loss {T + 1}-{len(results[0]['runs'][0]['loss'])}"]
  rows = []
  for r in results:
    band_cols = []
    for b in bands(T):
      vals = [run["bands"].get(str(b)) for run in r["runs"]]
      band_cols.append(common.mean_spread(vals, 3) if None not in vals else "-")
    beyond = [run["beyond_T"] for run in r["runs"]]
    rows.append([NAMES[r["family"]], f"{r['params']:,} ({r['non_embedding_params']:,})",
                 common.mean_spread([run["val_loss"] for run in r["runs"]]), *band_cols,
                 common.mean_spread(beyond, 3) if None not in beyond else "-"])
  md = common.markdown_table(header, rows) + (
      f"\n\nLoss in nats per token (bytes at the cpu scale); mean ± standard deviation over "
      f"{len(exp.seeds)} seed(s); training length {T}.")

  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for r in results:
    curve = np.mean([run["loss"] for run in r["runs"]], axis=0)
    k = min(21, len(curve))
    smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(len(smooth)) + k // 2 + 1, smooth, label=NAMES[r["family"]])
  ax.axvline(T, color="gray", ls="--", lw=1)
  ax.set_xlabel("position")
  ax.set_ylabel("loss (nats, moving average of 21)")
  ax.set_title(f"Loss against position, trained at {T}, mean of {len(exp.seeds)} seed(s)")
  ax.legend()
  common.write(exp, {"train_length": T, "models": results}, md, fig, argv)
  return {"models": results}


if __name__ == "__main__":
  common.cli(main)

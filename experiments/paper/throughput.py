"""Training throughput side by side: the Transformer (Pro) on the backend's best plain causal
attention, FoX (Pro), and FoX (Pro) with ACP (the FoX paper's throughput figure; the ACP
paper's end-to-end speed-up).

  python experiments/paper/throughput.py [--scale cpu|smoke|gpu] [--data_path P]

Writes runs/paper/throughput.{json,md,png}. Every model starts from its trained checkpoint
(the ladder's seed-0 runs and the ACP experiment's), since ACP prunes what the trained gates
forget (at initialisation every gate is 0.5 and almost everything would be pruned). At each
sequence length, with the same tokens per step, the models' jitted training steps run in
turns (round-robin, after two warm-up steps each), so that they share the machine's state;
tokens/s is the median over the rounds. The learning rate is tiny, so the parameters (and
the tiles ACP keeps) stay those of the trained model.

RESULTS, recorded on this machine (command; date; machine; JAX; commit):

`python experiments/paper/throughput.py`; 2026-11-29; x86_64, 2 CPU cores, 1 x cpu (cpu); JAX 0.10.2; commit 0d6a107

| model | attention | tokens/s at 256 | tokens/s at 1024 | tokens/s at 4096 |
|---|---|---|---|---|
| Transformer (Pro) | plain_attention (auto) | 6,454 | 5,338 | 3,962 |
| FoX (Pro) | forgetting_attention (auto) | 4,233 | 2,585 | 2,026 |
| FoX (Pro) + ACP | forgetting_attention (auto) | 4,513 (kept 1.00) | 2,769 (kept 0.83) | 4,196 (kept 0.32) |
| FoX (Pro) + ACP, small tiles | forgetting_attention (auto, 64x64) | 6,744 (kept 0.70) | 6,321 (kept 0.23) | 6,546 (kept 0.06) |

8,192 tokens per step at every length; median of 3 round(s) of one step per model, in turns; kept = ACP's kept tile fraction of the timed step; 'auto' runs the backend's default (cpu: see pallas_kernels/forgetting_attention/README.md).

Without ACP, the Transformer's plain attention is 1.5 to 2.1x faster than FoX's here: the
forgetting op computes the decay and its gradient, and its backward makes a pass for the
gate's row terms that plain attention does not. With ACP, FoX (Pro) catches up at 4096 on
the default tiles (4,196 against 3,962 tokens/s, 32% of the tiles kept) and with 64 x 64
tiles, which also skip the causally masked tiles that a single 256 x 256 tile computes,
runs 1.2 to 1.7x faster than the Transformer from 1024 up (23% and 6% kept). The papers'
figures are GPU ones (FoX 27k against the Transformer's 30k tokens/s at 760M and 16k on 4
L40S; ACP +10 to 40%): on this CPU, three timed rounds per length, the ratios, not the
absolute speeds, are what carry over.
"""

from __future__ import annotations

import time

import numpy as np

import common

import acp as acp_lib

NAMES = {"transformer_pro": "Transformer (Pro)", "fox_pro": "FoX (Pro)",
         "fox_pro_acp": "FoX (Pro) + ACP", "fox_pro_acp_small": "FoX (Pro) + ACP, small tiles"}


def plan(exp) -> tuple[list[int], int, int]:
  """(sequence lengths, tokens per step, timed rounds) of a scale."""
  if exp.scale == "smoke":
    return [128], 256, 2
  if exp.scale == "gpu":
    return [2048, 8192, 32768], 2**19, 5
  return [256, 1024, 4096], 8192, 3


def models(exp, seed: int) -> dict:
  """name -> (config, trained run directory) of the models compared."""
  runs = {f: common.train(exp, f, common.run_config(exp, f, seed))["workdir"]
          for f in ("transformer_pro", "fox_pro")}
  acp_c = common.run_config(exp, "fox_pro", seed, pruning=acp_lib.PRUNING,
                            block_sizes=acp_lib.block_sizes(exp))
  acp_dir = common.train(exp, "fox_pro-acp", acp_c)["workdir"]
  out = {f: (common.run_config(exp, f, seed), runs[f]) for f in runs}
  default_tiles = common.run_config(exp, "fox_pro", seed, pruning=acp_lib.PRUNING)
  out["fox_pro_acp"] = (default_tiles, acp_dir)
  out["fox_pro_acp_small"] = (acp_c, acp_dir)
  return out


def _stepper(c, workdir: str, L: int, tokens: int, corpus):
  """A jitted training step at length L from the run's checkpoint, and its batch of
  ``corpus`` (the training split, read once for every model and length)."""
  from fox_jax import evaluate
  from fox_jax import train as train_lib
  from fox_jax.data import PackedDataset
  c = c.copy_and_resolve_references()
  c.data.seq_len = L
  c.data.global_batch = max(tokens // L, 1)
  setup = train_lib.build(c)
  state = train_lib.init_state(setup, 0)
  _, state["params"] = evaluate.restore_params(workdir, setup)
  data = PackedDataset(corpus, L, 0)
  batch = train_lib.load_batch(setup, train_lib.rows_loader(setup, data, 0, c.data.global_batch, 1), c.data.global_batch, 1)
  step = train_lib.jit_train_step(setup)
  return setup, step, state, batch


def main(argv=None) -> dict:
  args = common.parser(__doc__, seeds=1).parse_args(argv)
  exp = common.Experiment.from_args("throughput", args)
  import jax
  lengths, tokens, rounds = plan(exp)
  compared = models(exp, exp.seeds[0])
  from fox_jax.data import corpus_from_config
  corpus = corpus_from_config(next(iter(compared.values()))[0].data, "train")
  table = {}
  for L in lengths:
    steppers = {}
    for name, (c, workdir) in compared.items():
      setup, step, state, batch = _stepper(c, workdir, L, tokens, corpus)
      for _ in range(2):  # compile and warm up
        state, m = step(state, batch, 1e-7)
      jax.block_until_ready(state)
      steppers[name] = [step, state, batch, [], m, setup]
    for _ in range(rounds):
      for name, s in steppers.items():
        t0 = time.perf_counter()
        s[1], s[4] = s[0](s[1], s[2], 1e-7)
        jax.block_until_ready(s[1])
        s[3].append(time.perf_counter() - t0)
    for name, s in steppers.items():
      m = jax.device_get(s[4])
      kept = float(m["kept_tiles"] / m["total_tiles"]) if m["total_tiles"] > 0 else None
      B = s[2].inputs.shape[1]
      table[(name, L)] = {"tokens_per_s": B * L / float(np.median(s[3])),
                          "step_s": [float(t) for t in s[3]], "kept_fraction": kept,
                          "attention": _attention(s[5].model_cfg)}
  header = ["model", "attention", *[f"tokens/s at {L}" for L in lengths]]
  rows = []
  for name in compared:
    cells = []
    for L in lengths:
      r = table[(name, L)]
      kept = "" if r["kept_fraction"] is None else f" (kept {r['kept_fraction']:.2f})"
      cells.append(f"{r['tokens_per_s']:,.0f}{kept}")
    rows.append([NAMES[name], table[(name, lengths[0])]["attention"], *cells])
  md = common.markdown_table(header, rows) + (
      f"\n\n{tokens:,} tokens per step at every length; median of {rounds} round(s) of one "
      f"step per model, in turns; kept = ACP's kept tile fraction of the timed step; "
      f"'auto' runs the backend's default ({jax.default_backend()}: see "
      f"pallas_kernels/forgetting_attention/README.md).")
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for name in compared:
    ax.plot(lengths, [table[(name, L)]["tokens_per_s"] for L in lengths], "o-",
            label=NAMES[name])
  common.log_lengths_axis(ax, lengths)
  ax.set(xlabel="sequence length", ylabel="training tokens/s",
         title=f"Training throughput, {tokens:,} tokens per step")
  ax.legend()
  common.write(exp, {"tokens_per_step": tokens, "rounds": rounds,
                     "results": [{"model": n, "length": L, **r} for (n, L), r in table.items()]},
               md, fig, argv)
  return table


def _attention(cfg) -> str:
  """The attention op a model runs, its implementation and tiles."""
  if cfg.forget_gate == "none" and cfg.plain_attn_impl != "forgetting":
    return f"plain_attention ({cfg.plain_attn_impl})"
  tiles = "" if cfg.block_sizes is None else f", {cfg.block_sizes.block_q}x{cfg.block_sizes.block_k}"
  return f"forgetting_attention ({cfg.attn_impl}{tiles})"


if __name__ == "__main__":
  common.cli(main)

"""Every experiment at the GPU scale: a 125M FoX (Pro) against the 125M Transformer (Pro),
2048-token rows, 2^28 (268M) tokens per run, evaluated with all of the above.

  python experiments/paper/gpu_scale.py [--data_path '/data/corpus/**/*.txt'] [--out runs/paper]

Runs, in order, each script's own main at --scale gpu with one seed: ladder.py (FoX (Pro) and
Transformer (Pro) only), acp.py (adds FoX (Pro) with ACP), needle.py, mqar.py and
throughput.py; results land beside the CPU ones as <script>_gpu.{json,md,png}. The model
recipe is experiments/configs/paper_2k.py (the paper's 125M settings, AdamW 2e-3, FSDP over
every device, bf16 compute, rematerialised blocks) with the budget cut from 2.5G to 2^28
tokens and warm-up to 2^25. On the built-in corpus the vocabulary is bytes; --data_path
trains on any text corpus (still byte-level: a subword tokenizer is issue 13's).

NOT YET RUN: no GPU was at hand when this was written. ``--scale smoke`` runs the same
sequence on tiny models in a minute (CI does).
"""

from __future__ import annotations

import common

STEPS = ("ladder", "acp", "needle", "mqar", "throughput")


def main(argv=None) -> None:
  p = common.parser(__doc__, seeds=1)
  p.set_defaults(scale="gpu")
  args = p.parse_args(argv)
  common.Experiment.from_args("gpu_scale", args)  # checks the flags before anything runs
  shared = ["--scale", args.scale, "--seeds", str(args.seeds), "--out", args.out]
  if args.tokens is not None:
    shared += ["--tokens", str(args.tokens)]
  for name in STEPS:
    module = __import__(name)
    extra = ["--families", "fox_pro,transformer_pro"] if name == "ladder" else []
    if args.data_path is not None and name != "mqar":  # MQAR is synthetic: no corpus
      extra += ["--data_path", args.data_path]
    print(f"[gpu_scale] {name} {' '.join(shared + extra)}", flush=True)
    module.main(shared + extra)


if __name__ == "__main__":
  common.cli(main)

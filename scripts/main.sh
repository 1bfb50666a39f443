#!/usr/bin/env bash
# The README's main command: from a clean clone to a plot. Creates its own virtual
# environment, trains a small FoX (Pro) and a small Transformer (Pro) on the built-in corpus
# (this interpreter's standard library, byte-level), evaluates both and writes into the run
# directory (default runs/main):
#   comparison.png   held-out loss against position, to 4x the training length
#   report.md        validation loss, loss at early / late / extrapolated positions
# Rerunning resumes finished or interrupted runs from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/main}"
source scripts/venv.sh
fox_venv ""
start=$(date +%s)
for model in fox_pro transformer_pro; do
  "$VENV/bin/fox-train" --config "experiments/configs/cpu_demo.py:${model}" --workdir "$RUN/$model"
done
"$VENV/bin/fox-eval" "$RUN/fox_pro" "$RUN/transformer_pro" --out "$RUN"
echo "main.sh: training and evaluation took $(( $(date +%s) - start )) s; see $RUN/report.md and $RUN/comparison.png"

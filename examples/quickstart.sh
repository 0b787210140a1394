#!/usr/bin/env bash
# The PRECODE story in four stages, on the built-in dataset (no download), in under 5 minutes on 2 CPU cores.
#
#   1. train      the paper's MLP with and without PRECODE, briefly: what does the defense cost in accuracy?
#   2. capture    the gradients a client would share for a few victims, from untrained models (the paper's setting)
#   3. attack     Inverting Gradients on those gradients alone
#   4. evaluate   one report, both models side by side: the plain MLP's images come back, the PRECODE MLP's do not
#
# Usage: bash examples/quickstart.sh [OUT_DIR]        (default: quickstart-out; the report is OUT_DIR/report/report.md)
# Knobs: VICTIMS (default 4), ITERATIONS (default 1000), EPOCHS (default 3), SEED (default 0).
set -euo pipefail

OUT=${1:-quickstart-out}
VICTIMS=${VICTIMS:-4}
ITERATIONS=${ITERATIONS:-1000}
EPOCHS=${EPOCHS:-3}
SEED=${SEED:-0}
PRECODE=${PRECODE:-precode}

started=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

for defense in none precode; do
  name=mlp; [ "$defense" = precode ] && name=mlp-precode
  step "train: $name, $EPOCHS epochs"
  $PRECODE train --model mlp --defense "$defense" --epochs "$EPOCHS" --seed "$SEED" --out "$OUT/runs/$name" --force
  step "capture-gradients: $name, untrained, victims 0..$((VICTIMS - 1)) of the built-in training split"
  $PRECODE capture-gradients --model mlp --defense "$defense" --indices "0:$VICTIMS" --batch-size 1 \
    --seed "$SEED" --out "$OUT/grads/$name" --force
  step "attack: Inverting Gradients on $name, $ITERATIONS iterations per victim"
  $PRECODE attack "$OUT/grads/$name" --method ig --iterations "$ITERATIONS" --seed "$SEED" \
    --out "$OUT/recon/$name" --force
done

accuracy() {  # last test accuracy in a run's history.json, in percent ("n/a" after 0 epochs)
  python3 -c 'import json, sys; e = json.load(open(sys.argv[1]))["epochs"]; print("%.1f" % (100 * e[-1]["test_accuracy"]) if e else "n/a")' "$1"
}
note="Quick start (examples/quickstart.sh): the PRECODE paper's MLP without and with PRECODE, attacked while
untrained as in the paper, $VICTIMS built-in victims at batch size 1, labels shared. Inverting Gradients uses the
paper's settings except for the iteration count: $ITERATIONS instead of 7000, so that the whole run finishes in
under 5 minutes on 2 CPU cores (the undefended MLP is already fully recovered by then). The price of the defense:
after $EPOCHS training epochs on the built-in dataset, test accuracy is $(accuracy "$OUT/runs/mlp/history.json")%
without PRECODE and $(accuracy "$OUT/runs/mlp-precode/history.json")% with it."

step "evaluate: both models side by side"
$PRECODE evaluate "$OUT/recon/mlp" "$OUT/recon/mlp-precode" --truth "$OUT/grads/mlp" --truth "$OUT/grads/mlp-precode" \
  --note "$note" --out "$OUT/report" --force

step "done in $(( $(date +%s) - started )) s: open $OUT/report/report.md (picture: $OUT/report/grid.png)"

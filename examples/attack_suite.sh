#!/usr/bin/env bash
# The attack suite on real CIFAR-10 victims: what each attack does to the paper's MLP, with and without PRECODE.
#
#   bash examples/attack_suite.sh ../shared/data/cifar10-victims-shared [OUT]
#
# DATA is an image folder of CIFAR-10 images (class sub-folders). Untrained models, batch size 1, seed 0.
# Victims 0..VICTIMS-1 are attacked with analytic, ig (PRECODE preset) and, on the PRECODE MLP, ig-adaptive;
# victims 0..LABEL_VICTIMS-1 are captured without labels to measure label recovery. Knobs: VICTIMS=8,
# LABEL_VICTIMS=32, ITERATIONS (default: the preset's 7000).
set -euo pipefail
DATA=${1:?usage: attack_suite.sh DATA_DIR [OUT]}
OUT=${2:-attack-suite-out}
VICTIMS=${VICTIMS:-8}
LABEL_VICTIMS=${LABEL_VICTIMS:-32}
ITERS=()
if [ -n "${ITERATIONS:-}" ]; then ITERS=(--iterations "$ITERATIONS"); fi
PRECODE=${PRECODE:-precode}
src=(--dataset imagefolder --data-dir "$DATA" --split all --seed 0 --force)

for defense in none precode; do
  $PRECODE capture-gradients --model mlp --defense "$defense" "${src[@]}" --indices "0:$VICTIMS" --out "$OUT/grads/$defense"
  $PRECODE capture-gradients --model mlp --defense "$defense" "${src[@]}" --indices "0:$LABEL_VICTIMS" \
    --no-share-labels --out "$OUT/grads-nolabels/$defense"
  $PRECODE attack "$OUT/grads/$defense" --method analytic --out "$OUT/recon/analytic-$defense" --force
  $PRECODE attack "$OUT/grads/$defense" --method ig --preset precode "${ITERS[@]}" --out "$OUT/recon/ig-$defense" --force
  # Labels read off the gradient (analytic reconstructs instantly and records the recovered labels).
  $PRECODE attack "$OUT/grads-nolabels/$defense" --method analytic --out "$OUT/recon/labels-$defense" --force
done
$PRECODE attack "$OUT/grads/precode" --method ig-adaptive --preset precode "${ITERS[@]}" \
  --out "$OUT/recon/ig-adaptive-precode" --force

for run in analytic-none analytic-precode ig-none ig-precode ig-adaptive-precode; do
  defense=${run##*-}
  $PRECODE evaluate "$OUT/recon/$run" --truth "$OUT/grads/$defense" --out "$OUT/report/$run" --force
done
for defense in none precode; do
  $PRECODE evaluate "$OUT/recon/labels-$defense" --truth "$OUT/grads-nolabels/$defense" \
    --out "$OUT/report/labels-$defense" --force
done
echo "Reports in $OUT/report/*/report.md"

#!/usr/bin/env bash
# Reproduce the PRECODE notebook's experiment, then the adaptive attacks on the same victims.
#
#   bash examples/reproduce_precode.sh ../shared/data/cifar10-victims-shared.safetensors [OUT]
#
# The first 10 victims of the PRECODE paper's CIFAR-10 victim set (a .safetensors file of images and labels in
# victim order, or an image folder), normalised with CIFAR-10's published statistics; untrained MLP and MLP with
# PRECODE (seed 0), batch size 1, labels shared; Inverting Gradients with the precode preset (7000 iterations);
# SSIM in the notebook's convention (--space normalized) and in pixel space. Published: mean SSIM 0.99969
# (MLP) and 0.00450 (MLP + PRECODE). Knobs: VICTIMS=10, ITERATIONS (default: the preset's 7000).
set -euo pipefail
DATA=${1:?usage: reproduce_precode.sh DATA [OUT]}
OUT=${2:-reproduce-out}
VICTIMS=${VICTIMS:-10}
PRECODE=${PRECODE:-precode}
ITERS=()
if [ -n "${ITERATIONS:-}" ]; then ITERS=(--iterations "$ITERATIONS"); fi
if [[ "$DATA" == *.safetensors ]]; then dataset=tensors; else dataset=imagefolder; fi
src=(--dataset "$dataset" --data-dir "$DATA" --split all --stats cifar10 --indices "0:$VICTIMS" --seed 0 --force)

step() { printf '\n== %s\n' "$*" >&2; }
for defense in none precode; do
  step "capture: mlp, defense $defense, victims 0..$((VICTIMS - 1))"
  $PRECODE capture-gradients --model mlp --defense "$defense" "${src[@]}" --out "$OUT/grads/$defense"
  step "attack: ig (precode preset) on mlp + $defense"
  $PRECODE attack "$OUT/grads/$defense" --method ig --preset precode "${ITERS[@]}" --out "$OUT/recon/ig-$defense" --force
done
step "adaptive attacks on mlp + precode"
$PRECODE attack "$OUT/grads/precode" --method analytic --out "$OUT/recon/analytic-precode" --force
$PRECODE attack "$OUT/grads/precode" --method ig-adaptive --preset precode "${ITERS[@]}" \
  --out "$OUT/recon/ig-adaptive-precode" --force

note="The PRECODE notebook's experiment on the first $VICTIMS victims of its CIFAR-10 victim set; published mean SSIM 0.99969 (MLP) and 0.00450 (MLP + PRECODE)."
for space in normalized pixel; do
  step "evaluate: SSIM in $space space"
  $PRECODE evaluate "$OUT/recon/ig-none" "$OUT/recon/ig-precode" "$OUT/recon/analytic-precode" \
    "$OUT/recon/ig-adaptive-precode" --truth "$OUT/grads/none" --truth "$OUT/grads/precode" \
    --space "$space" --note "$note" --out "$OUT/report-$space" --force
done
echo "Reports: $OUT/report-normalized/report.md (the notebook's convention) and $OUT/report-pixel/report.md" >&2

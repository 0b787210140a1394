#!/usr/bin/env bash
# The PRECODE story on the built-in dataset (no download), in three stages and one picture.
#
#   1. capture    the gradients a client would share for a few victims, from the PRECODE paper's MLP without and
#                 with PRECODE, both untrained (the paper's setting; the quick start trains nothing)
#   2. attack     Inverting Gradients on those gradients alone (the fast preset: 1000 iterations, early stop)
#   3. evaluate   one report, both models side by side: the plain MLP's images come back, the PRECODE MLP's do not
#   then          OUT_DIR/report/story.png: the originals, the plain model's and the PRECODE model's
#                 reconstructions, each with its SSIM (drawn by `python -m precode_cli.plots story`)
#
# The report's note and the last line give this script's measured wall time. What PRECODE costs in accuracy is
# not measured here: train both models (`precode train --model mlp --defense precode`, see README.md) or run
# benchmarks/precode_utility.py.
#
# Usage: bash examples/quickstart.sh [OUT_DIR]        (default: quickstart-out; the report is OUT_DIR/report/report.md)
# Knobs: VICTIMS (default 4), ITERATIONS (default 1000), SEED (default 0), CAPTURE_OPTIONS (more options for
# capture-gradients; the tests use "--width 16 --image-size 8" for a seconds-long run of the whole script).
set -euo pipefail

OUT=${1:-quickstart-out}
VICTIMS=${VICTIMS:-4}
ITERATIONS=${ITERATIONS:-1000}
SEED=${SEED:-0}
PRECODE=${PRECODE:-precode}
CAPTURE_OPTIONS=${CAPTURE_OPTIONS:-}
PYTHON=${PYTHON:-python3}

started=$(date +%s)
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

for defense in none precode; do
  name=mlp; [ "$defense" = precode ] && name=mlp-precode
  step "capture-gradients: $name, untrained, victims 0..$((VICTIMS - 1)) of the built-in training split"
  # shellcheck disable=SC2086  # CAPTURE_OPTIONS is a list of options
  $PRECODE capture-gradients --model mlp --defense "$defense" --indices "0:$VICTIMS" $CAPTURE_OPTIONS \
    --seed "$SEED" --out "$OUT/grads/$name" --force
  step "attack: Inverting Gradients on $name, $ITERATIONS iterations per victim"
  $PRECODE attack "$OUT/grads/$name" --method ig --preset fast --iterations "$ITERATIONS" --seed "$SEED" \
    --out "$OUT/recon/$name" --force
done

elapsed=$(( $(date +%s) - started ))
note="Quick start (examples/quickstart.sh): the PRECODE paper's MLP${CAPTURE_OPTIONS:+ (capture options: $CAPTURE_OPTIONS)} without and with PRECODE, both untrained as in
the paper (the quick start trains nothing, so it says nothing about what PRECODE costs in accuracy), $VICTIMS
built-in victims at batch size 1, labels shared. Inverting Gradients uses the paper's settings except for the
iteration count, $ITERATIONS instead of 7000, and an early stop (the fast preset: a victim whose matching loss
improved by less than 1% over 100 iterations stops there). Capturing and attacking took $elapsed s of wall time on this machine,
measured by the script."

step "evaluate: both models side by side"
$PRECODE evaluate "$OUT/recon/mlp" "$OUT/recon/mlp-precode" --truth "$OUT/grads/mlp" --truth "$OUT/grads/mlp-precode" \
  --note "$note" --out "$OUT/report" --force

step "story.png: originals and both models' reconstructions in one picture"
$PYTHON -m precode_cli.plots story "$OUT/report" "$OUT/report/story.png"

elapsed=$(( $(date +%s) - started ))
printf '\n## The whole quick start\n\n![originals, the plain model'"'"'s and the PRECODE model'"'"'s reconstructions](story.png)\n\nWall time of examples/quickstart.sh, measured: %s s (capture, attack, evaluate and story.png).\n' \
  "$elapsed" >> "$OUT/report/report.md"
step "done in $elapsed s: open $OUT/report/report.md (picture: $OUT/report/story.png)"

#!/usr/bin/env bash
# A Flower federation audited with precode: what the FedAvg server records, attacked and scored in one report.
#
#   1. simulate   examples/flower/app.py in Flower's own simulation (Ray): the PRECODE paper's MLP, untrained, without
#                 and with PRECODE; 4 clients of 1 built-in image each, 2 rounds of FedAvg, each client training
#                 LOCAL_STEPS steps of SGD with precode's helper. The server wraps FedAvg in precode's
#                 RecordingStrategy, which records the replies of the RECORD rounds (OUT_DIR/<model>/updates); a client
#                 mod writes the matching truth files (OUT_DIR/<model>/truth)
#   2. attack     precode attack --method ig on the recorded updates alone
#   3. evaluate   one report for both models, OUT_DIR/report/report.md, and OUT_DIR/report/story.png
#
# Usage: bash examples/flower/run.sh OUT_DIR
# Knobs: CLIENTS (4), ROUNDS (2), RECORD (the rounds the server records and the attack gets; default the last, so each
# client's image is attacked once; RECORD="1 2" doubles the attack's work), IMAGES per client (1), LOCAL_STEPS (1),
# LR (0.1), ITERATIONS (1000), SEED (0). OUT_DIR must be new or empty.
# Needs `pip install "precode[flower]"`. Flower's telemetry, update check and run-time installs are off.
set -euo pipefail

OUT=${1:?usage: bash examples/flower/run.sh OUT_DIR}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then  # node ids are random per run: old files would be attacked too
  echo "examples/flower/run.sh: $OUT is not empty; give a new or empty OUT_DIR." >&2
  exit 2
fi
CLIENTS=${CLIENTS:-4}
ROUNDS=${ROUNDS:-2}
IMAGES=${IMAGES:-1}
LOCAL_STEPS=${LOCAL_STEPS:-1}
LR=${LR:-0.1}
ITERATIONS=${ITERATIONS:-1000}
SEED=${SEED:-0}
RECORD=${RECORD:-$ROUNDS}  # the rounds the server records and the attack gets: the last (each client's image once)
PRECODE=${PRECODE:-precode}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_DEDUP_LOGS=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0

started=$(date +%s)
step() { printf '\n\033[1m== [%4d s] %s\033[0m\n' "$(( $(date +%s) - started ))" "$*" >&2; }

for defense in none precode; do
  name=mlp; [ "$defense" = precode ] && name=mlp-precode
  step "simulate: $name, $CLIENTS clients x $IMAGES image(s), $ROUNDS rounds of FedAvg, $LOCAL_STEPS local step(s)"
  $PYTHON "$HERE/simulate.py" --defense "$defense" --out "$OUT/$name" --clients "$CLIENTS" --rounds "$ROUNDS" \
    --images "$IMAGES" --local-steps "$LOCAL_STEPS" --lr "$LR" --seed "$SEED" --record $RECORD
  step "attack: Inverting Gradients on the $name updates the server recorded, $ITERATIONS iterations"
  $PRECODE attack "$OUT/$name/updates" --method ig --iterations "$ITERATIONS" --seed "$SEED" \
    --out "$OUT/$name/recon"
done

elapsed=$(( $(date +%s) - started ))
note="Flower example (examples/flower/run.sh): a FedAvg federation in Flower's simulation, $CLIENTS clients of $IMAGES
built-in image(s) each, $ROUNDS rounds, $LOCAL_STEPS local SGD step(s) at lr $LR, the PRECODE paper's MLP untrained
without and with PRECODE. The server recorded every client's reply of round(s) $RECORD (precode's RecordingStrategy),
and Inverting Gradients attacked each ($ITERATIONS iterations, labels recovered from the update); a client's image
appears once per recorded round.
Simulating and attacking took $elapsed s of wall time on this machine, measured by the script."

step "evaluate: both federations side by side"
$PRECODE evaluate "$OUT/mlp/recon" "$OUT/mlp-precode/recon" --truth "$OUT/mlp/truth" --truth "$OUT/mlp-precode/truth" \
  --note "$note" --out "$OUT/report"

step "story.png: originals and both models' reconstructions in one picture"
$PYTHON -m precode_cli.plots story "$OUT/report" "$OUT/report/story.png"

elapsed=$(( $(date +%s) - started ))
printf '\n## The whole Flower example\n\n![originals, the plain model'"'"'s and the PRECODE model'"'"'s reconstructions](story.png)\n\nWall time of examples/flower/run.sh, measured: %s s (simulations, attacks, evaluate and story.png).\n' \
  "$elapsed" >> "$OUT/report/report.md"
step "done in $elapsed s: open $OUT/report/report.md (picture: $OUT/report/story.png)"

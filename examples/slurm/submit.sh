#!/bin/bash
# The whole pipeline on a Slurm cluster: a capture array, an attack array after it, an evaluate after that.
# Usage: SHARDS=4 INDICES=0:128 bash examples/slurm/submit.sh   (run from the folder the results go to)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shards=${SHARDS:-4}
export SHARDS=$shards GRADS=${GRADS:-grads} RECON=${RECON:-recon} REPORT=${REPORT:-report} INDICES=${INDICES:-0:128}
capture=$(sbatch --parsable --array=0-$((shards - 1)) --export=ALL "$here/capture.sbatch")
attack=$(sbatch --parsable --array=0-$((shards - 1)) --dependency=afterok:$capture --export=ALL "$here/attack.sbatch")
evaluate=$(sbatch --parsable --dependency=afterok:$attack --export=ALL "$here/evaluate.sbatch")
echo "capture $capture, attack $attack, evaluate $evaluate"

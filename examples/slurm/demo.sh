#!/bin/bash
# Proof on a real Slurm: set up a single-node cluster on this machine (Debian, as root), run a 4-task capture
# array and a 4-task attack array over 16 dumps, cancel one attack task mid-run, resubmit it with --resume,
# evaluate after it, and check that the reconstructions equal a single-process run's (torch.equal).
# Usage (with precode on PATH, e.g. its virtual environment active):
#   bash examples/slurm/demo.sh 2>&1 | tee examples/slurm/demo.log   (the log of the last run is there)
# Not for CI: it installs packages and starts daemons (munged, slurmctld, slurmd).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-/tmp/precode-slurm-demo}
command -v precode >/dev/null || { echo "precode is not on PATH; activate its virtual environment first" >&2; exit 1; }
log() { echo "[$(date +%T)] $*"; }

setup_slurm() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
    fi
    local host; host=$(hostname -s)
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
    cat > /etc/slurm/slurm.conf <<CONF
ClusterName=precode-demo
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
KillWait=60
NodeName=$host CPUs=2 State=UNKNOWN
PartitionName=demo Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    [ -s /etc/munge/munge.key ] || mungekey --create
    chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
    pgrep -x munged >/dev/null || munged --force
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
        sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && break
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    sinfo
}

wait_for() {  # until none of the given jobs is pending or running
    while [ -n "$(squeue -h -j "$1" 2>/dev/null)" ]; do sleep 2; done
}

setup_slurm
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export SHARDS=4 GRADS=grads RECON=recon REPORT=report INDICES=0:16
export ATTACK_ARGS="--iterations 400 --checkpoint-iterations 25 --vectorize 4"

log "capture: a 4-task array over 16 victims"
capture=$(sbatch --parsable --array=0-3 --export=ALL "$here/capture.sbatch")
wait_for "$capture"
log "capture done: $(ls grads/*.truth.safetensors | wc -l) dumps, states: $(ls grads/states | wc -l), size $(du -sh grads | cut -f1)"

log "attack: a 4-task array, 4 dumps (one vectorised chunk) per task"
attack=$(sbatch --parsable --array=0-3 --dependency=afterok:$capture --export=ALL "$here/attack.sbatch")
until [ -f recon/checkpoints/train-000004.safetensors ]; do sleep 1; done  # task 1 is mid-run
log "cancelling task ${attack}_1 mid-run (SIGTERM, as before a preemption)"
scancel "${attack}_1"
wait_for "$attack"
log "after the cancel: checkpoints $(ls recon/checkpoints 2>/dev/null | tr '\n' ' ')"
cat slurm-precode-attack-${attack}_1.out | tail -3

log "resubmitting task 1 with --resume, and the evaluate after it"
requeued=$(sbatch --parsable --array=1 --export=ALL,RESUME=1 "$here/attack.sbatch")
evaluate=$(sbatch --parsable --dependency=afterok:$requeued --export=ALL "$here/evaluate.sbatch")
wait_for "$requeued"; wait_for "$evaluate"
tail -6 slurm-precode-attack-${requeued}_1.out
cat slurm-precode-evaluate-${evaluate}.out | tail -8

log "single-process reference run (one thread, as the array tasks: BLAS sums in another order with more)"
export OMP_NUM_THREADS=1
precode capture-gradients --indices 0:16 --out ref-grads > ref.log 2>&1
precode attack ref-grads $ATTACK_ARGS --out ref-recon >> ref.log 2>&1
precode evaluate ref-recon --truth ref-grads --out ref-report >> ref.log 2>&1

python - <<'PY'
import json, sys
from pathlib import Path
import torch
from precode_cli import fileformat
names = sorted(p.name for p in Path("ref-recon").glob("*.safetensors"))
same = all(torch.equal(fileformat.read(Path("recon") / n, "reconstruction").tensors[t],
                       fileformat.read(Path("ref-recon") / n, "reconstruction").tensors[t])
           for n in names for t in ("images", "labels", "loss_trace"))
done = all(fileformat.read_meta(Path("recon") / n, "reconstruction")["attack"]["completed"] for n in names)
sharded, single = (json.loads(Path(d, "metrics.json").read_text()) for d in ("report", "ref-report"))
groups = len(sharded["groups"])
ssim = [g["summary"].get("mean_ssim", g["summary"].get("ssim")) for g in (sharded["groups"][0], single["groups"][0])]
print(f"{len(names)} reconstructions; torch.equal to the single-process run: {same}; all complete: {done}; "
      f"groups in the sharded report: {groups}; mean SSIM sharded/single: {ssim}")
sys.exit(0 if same and done and groups == 1 else 1)
PY
log "demo passed"

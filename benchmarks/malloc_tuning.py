"""Does raising glibc's malloc thresholds speed up an attack loop? Side by side, in one run.

Runs the same Inverting Gradients attack (paper's MLP, one built-in victim, fixed iterations) in
fresh processes with precode's allocator tuning on and off, alternating, and reports the median
time per iteration and the ratio. Prints a table and writes JSON.

    python benchmarks/malloc_tuning.py --iterations 300 --repeats 3 --json malloc_tuning.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time, torch
from precode_cli.cli_support import tune_allocator
tune_allocator()
from precode_cli import data, models
from defenses import stack_from_cli
from attacks.base import AttackTarget
from attacks.inverting_gradients import InvertingGradients
iterations = int(sys.argv[1])
spec = data.data_spec("builtin")
victims = data.load("builtin", "train")
torch.manual_seed(0)
stack = stack_from_cli("none")
model = stack.build_model(models.make_spec("mlp", tuple(spec["input_shape"]), spec["num_classes"]))
x, y = data.normalize(victims.images[:1], spec), victims.labels[:1]
names = [n for n, _ in model.named_parameters()]
grads = torch.autograd.grad(stack.loss(model, model(x), y), list(model.parameters()))
target = AttackTarget(model, stack.loss, names, list(grads), y, 1, (3, 32, 32), 10,
                      data.normalize(torch.zeros(1, 3, 1, 1), spec), data.normalize(torch.ones(1, 3, 1, 1), spec))
started = time.perf_counter()
InvertingGradients(iterations=iterations).run(target, seed=0)
print((time.perf_counter() - started) / iterations * 1000)
"""


def run_once(tuned: bool, iterations: int) -> float:
    env = {**os.environ, "PRECODE_MALLOC_TUNING": "1" if tuned else "0"}
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(iterations)], env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="malloc_tuning.json")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"default": [], "tuned": []}
    for _ in range(args.repeats):
        times["default"].append(run_once(False, args.iterations))
        times["tuned"].append(run_once(True, args.iterations))
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["default"] / medians["tuned"]
    print(f"{'allocator':<10} {'median ms/iter':>15} {'runs (ms/iter)':>30}")
    for key in ("default", "tuned"):
        print(f"{key:<10} {medians[key]:>15.2f} {', '.join(f'{t:.1f}' for t in times[key]):>30}")
    print(f"speed-up of tuning: {ratio:.2f}x")
    result = {"benchmark": "malloc_tuning", "iterations": args.iterations, "repeats": args.repeats,
              "ms_per_iteration": times, "median_ms_per_iteration": medians, "speedup": ratio,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

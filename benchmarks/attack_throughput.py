"""How many victim-iterations per second Inverting Gradients does, many victims at once vs one by one.

For each model and each count V of victims, runs the same `ig` attack (PRECODE preset settings,
fixed iterations) on V built-in victims of an untrained model twice in one process: once
vectorised (all V together, as `precode attack --vectorize V` does, with the engine the problem
picks) and once in a loop that attacks them one at a time (as `--vectorize 1` does). Alternating
the two and taking medians keeps machine noise off the ratio. Prints a table and writes JSON.

`--weights own` gives every victim other weights (dumps of other epochs or rounds), `--weights
groups:G` G distinct weight sets; `--busy N` runs N busy processes alongside, as a shared machine has.

    python benchmarks/attack_throughput.py --models mlp,mlp+precode,lenet --victims 8,32 --threads 1
    python benchmarks/attack_throughput.py --models lenet,mlp --weights own --busy 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from attacks.base import AttackTarget
from attacks.optimization import MatchingConfig, make_problem, match_gradients
from defenses import stack_from_cli
from precode_cli import __version__, data, models
from precode_cli.cli_support import tune_allocator


def make_targets(model_name: str, defense: str, count: int, device: torch.device,
                 weight_sets: int = 1) -> list[AttackTarget]:
    """`count` victims (built-in training images 0..count-1) of an untrained model, batch size 1; victim i
    has weight set i mod `weight_sets` (1: one client model for all, as one capture run gives)."""
    spec = data.data_spec("builtin")
    victims = data.load("builtin", "train")
    stack = stack_from_cli(defense)
    model_spec = models.make_spec(model_name, tuple(spec["input_shape"]), spec["num_classes"])
    targets = []
    for i in range(count):
        torch.manual_seed(i % weight_sets)
        model = stack.build_model(model_spec).to(device).train()
        x = data.normalize(victims.images[i : i + 1], spec).to(device)
        y = victims.labels[i : i + 1].to(device)
        names = [n for n, _ in model.named_parameters()]
        grads = torch.autograd.grad(stack.loss(model, model(x), y), list(model.parameters()))
        lower = data.normalize(torch.zeros(1, 3, 1, 1), spec).to(device)
        upper = data.normalize(torch.ones(1, 3, 1, 1), spec).to(device)
        targets.append(AttackTarget(model, stack.loss, names, list(grads), y, 1, tuple(spec["input_shape"]),
                                    spec["num_classes"], lower, upper))
    return targets


def timed(targets: list[AttackTarget], config: MatchingConfig, device: torch.device) -> float:
    started = time.perf_counter()
    match_gradients(targets, [t.labels for t in targets], config, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def weight_sets_of(spec: str, count: int) -> int:
    """`shared` -> 1, `own` -> one per victim, `groups:G` -> G."""
    if spec == "shared":
        return 1
    if spec == "own":
        return count
    if spec.startswith("groups:") and spec[7:].isdigit() and int(spec[7:]) >= 1:
        return int(spec[7:])
    raise SystemExit(f"--weights takes shared, own or groups:G; not {spec!r}")


def spin() -> None:
    """A busy process, as another user's job on a shared machine."""
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,lenet", help="comma-separated; MODEL+DEFENSE for a defense")
    parser.add_argument("--defense", default="none", help="for models given without one")
    parser.add_argument("--victims", default="1,8,32")
    parser.add_argument("--weights", default="shared", help="shared, own or groups:G (see above)")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--busy", type=int, default=0, help="busy processes running alongside")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/attack_throughput.json"))
    args = parser.parse_args()
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = MatchingConfig(iterations=args.iterations, progress_every=10**9)
    console = Console(width=150)
    busy = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for process in busy:
        process.start()
    rows = []
    try:
        for setting in args.models.split(","):
            model_name, _, defense = setting.partition("+")
            defense = defense or args.defense
            for count in [int(v) for v in args.victims.split(",")]:
                sets = weight_sets_of(args.weights, count)
                targets = make_targets(model_name, defense, count, device, sets)
                engine = make_problem(targets, [t.labels for t in targets], config, seed=0).engine
                timed(targets[:1], MatchingConfig(iterations=2), device)  # warm-up
                if count > 1:
                    timed(targets, MatchingConfig(iterations=2), device)
                together, alone = [], []
                for _ in range(args.repeats):
                    together.append(timed(targets, config, device))
                    alone.append(sum(timed([t], config, device) for t in targets))
                work = count * args.iterations
                row = {
                    "model": model_name, "defense": defense, "victims": count, "weight_sets": min(sets, count),
                    "engine": engine, "iterations": args.iterations,
                    "vectorised_victim_its_per_s": work / statistics.median(together),
                    "loop_victim_its_per_s": work / statistics.median(alone),
                }
                row["speedup"] = row["vectorised_victim_its_per_s"] / row["loop_victim_its_per_s"]
                rows.append(row)
                console.print(f"{setting} x{count} ({engine}): {row['speedup']:.2f}x")
    finally:
        for process in busy:
            process.terminate()
    title = (f"ig throughput ({device}, {torch.get_num_threads()} threads, weights {args.weights}"
             f"{f', {args.busy} busy processes alongside' if args.busy else ''})")
    table = Table(title=title)
    for column in ("model", "defense", "victims", "weight sets", "engine", "vectorised victim-it/s",
                   "one-by-one victim-it/s", "speedup"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["model"], r["defense"], str(r["victims"]), str(r["weight_sets"]), r["engine"],
                      f"{r['vectorised_victim_its_per_s']:.1f}", f"{r['loop_victim_its_per_s']:.1f}",
                      f"{r['speedup']:.2f}x")
    console.print(table)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    args.json.write_text(json.dumps({
        "benchmark": "attack_throughput", "device": str(device), "device_name": device_name,
        "threads": torch.get_num_threads(), "torch": str(torch.__version__), "precode": __version__,
        "load_average_at_end": os.getloadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": rows,
    }, indent=2) + "\n")
    console.print(f"Wrote {args.json}.")


if __name__ == "__main__":
    main()

"""Attacks on FedAvg client updates: leakage and cost against the number of local steps.

For every setting (local steps, momentum, defense, attack) it runs the real pipeline through the
CLI, as a user would: `capture-gradients --local-steps N` on V built-in victims of an untrained MLP
(one image per client, so every local step trains on that image), `attack` with the same settings
and `evaluate`. The single-gradient attack (`capture-gradients` without --local-steps) on the same
victims runs in the same process, so each setting's cost per iteration is reported as a ratio to it.
Prints a table and writes JSON.

The cost per iteration is measured separately, in one process, side by side: `--timing` reads the
dumps and updates the leakage runs captured and times the attack's iteration (`problem.step()`, the
engine `precode attack` uses for them) on all V victims at once, alternating between the settings
for several rounds and taking medians, so that a busy machine slows every setting alike.

    python benchmarks/federated_updates.py --victims 8 --iterations 1000 --out /tmp/fedavg-bench
    python benchmarks/federated_updates.py --timing --out /tmp/fedavg-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runs import precode, recorded_seconds  # noqa: E402  (the benchmarks folder is not a package)

ROOT = Path(__file__).resolve().parent.parent
# (label, capture options, defense, attack method)
SETTINGS = [
    ("gradient", [], "none", "ig"),
    ("1 step", ["--local-steps", "1"], "none", "ig"),
    ("3 steps", ["--local-steps", "3"], "none", "ig"),
    ("3 steps, momentum 0.9", ["--local-steps", "3", "--momentum", "0.9"], "none", "ig"),
    ("10 steps", ["--local-steps", "10"], "none", "ig"),
    ("gradient", [], "precode", "ig"),
    ("1 step", ["--local-steps", "1"], "precode", "ig"),
    ("3 steps", ["--local-steps", "3"], "precode", "ig"),
    ("3 steps, momentum 0.9", ["--local-steps", "3", "--momentum", "0.9"], "precode", "ig"),
    ("10 steps", ["--local-steps", "10"], "precode", "ig"),
    ("3 steps", ["--local-steps", "3"], "precode", "ig-adaptive"),
    ("3 steps", ["--local-steps", "3"], "precode", "ig-noise"),
]


def run_setting(out: Path, index: int, label: str, capture: list[str], defense: str, method: str,
                args: argparse.Namespace) -> dict:
    folder = out / f"{index:02d}"
    grads, recon, report = folder / "grads", folder / "recon", folder / "report"
    lr = ["--local-lr", str(args.local_lr)] if capture else []
    precode("capture-gradients", "--model", "mlp", "--defense", defense, "--indices", f"0:{args.victims}",
            "--pick", "random", "--seed", args.seed, *capture, *lr, "--out", grads, "--force")
    if args.capture_only:
        return {}
    precode("attack", grads, "--method", method, "--iterations", args.iterations, "--vectorize", args.victims,
            "--seed", args.seed, "--out", recon, "--force")
    # The attack loop's own time (each reconstruction records its share of its group's), not process start-up.
    seconds = sum(recorded_seconds(path) for path in sorted(recon.glob("*.safetensors")))
    precode("evaluate", recon, "--truth", grads, "--out", report, "--force")
    summary = json.loads((report / "metrics.json").read_text())["groups"][0]["summary"]
    return {"setting": label, "defense": defense, "method": method, "capture": capture + lr,
            "victims": summary["n"], "mean_ssim": summary["mean_ssim"], "asr": summary["asr"],
            "attack_seconds": seconds, "seconds_per_iteration": seconds / args.iterations}


def timing(args: argparse.Namespace) -> None:
    """Median seconds per attack iteration of every captured setting, alternating, in this process."""
    import statistics

    import torch

    import attacks
    from attacks.inverting_gradients import resolve_labels
    from attacks.optimization import make_problem
    from precode_cli.stages.attack import read_dump, target_from_dump

    torch.set_num_threads(args.threads)
    problems = {}
    for index, (label, _, defense, method) in enumerate(SETTINGS):
        grads = args.out / f"{index:02d}" / "grads"
        paths = sorted(p for p in grads.glob("*.safetensors") if not p.name.endswith(".truth.safetensors"))
        if not paths:
            continue
        targets = [target_from_dump(read_dump(p), p) for p in paths]
        attack = attacks.create(method, iterations=args.iterations)
        problem = make_problem(targets, [resolve_labels(t)[0] for t in targets], attack.config_for(targets[0]), 0)
        problem.step()  # warm-up
        problems[index] = problem
    samples = {index: [] for index in problems}
    for _ in range(args.rounds):
        for index, problem in problems.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                problem.step()
            samples[index].append((time.perf_counter() - started) / args.steps)
    rows = []
    for index, problem in problems.items():
        label, _, defense, method = SETTINGS[index]
        rows.append({"setting": label, "defense": defense, "method": method, "engine": problem.engine,
                     "victims": problem.victims, "seconds_per_iteration": statistics.median(samples[index])})
    base = {r["defense"]: r["seconds_per_iteration"] for r in rows if r["setting"] == "gradient"}
    table = Table(title=f"seconds per attack iteration, {args.threads} thread(s), all victims at once, median of "
                        f"{args.rounds} alternating rounds of {args.steps} iterations")
    for column in ("defense", "attack", "what the client sent", "engine", "s / iteration", "x gradient"):
        table.add_column(column)
    for row in rows:
        row["cost_vs_gradient"] = row["seconds_per_iteration"] / base.get(row["defense"], float("nan"))
        table.add_row(row["defense"], row["method"], row["setting"], row["engine"],
                      f"{row['seconds_per_iteration']:.4f}", f"{row['cost_vs_gradient']:.1f}")
    Console(width=130).print(table)
    target = args.json.with_name(args.json.stem + "_timing.json")
    target.write_text(json.dumps({"benchmark": "federated_updates --timing", "threads": args.threads,
                                  "rounds": args.rounds, "steps": args.steps, "machine": platform.platform(),
                                  "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--local-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated setting numbers to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/precode-fedavg-bench"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "federated_updates.json")
    parser.add_argument("--timing", action="store_true", help="time the iterations of what --out holds, side by side")
    parser.add_argument("--capture-only", action="store_true", help="capture every setting's files for --timing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.timing:
        timing(args)
        return
    chosen = {int(i) for i in args.only.split(",") if i} or set(range(len(SETTINGS)))
    rows = []
    for index, setting in enumerate(SETTINGS):
        if index in chosen:
            rows.append(run_setting(args.out, index, *setting, args))
            print(json.dumps(rows[-1]), flush=True)
    if args.capture_only:
        return
    single = {r["defense"]: r["seconds_per_iteration"] for r in rows if r["setting"] == "gradient"}
    table = Table(title=f"ig on FedAvg updates: untrained MLP, built-in data, 1 image per client, {args.victims} "
                        f"victims, {args.iterations} iterations, local lr {args.local_lr}")
    for column in ("defense", "attack", "what the client sent", "mean SSIM", "ASR", "s / iteration", "x gradient"):
        table.add_column(column, justify="left" if column in ("defense", "attack", "what the client sent") else "right")
    for row in rows:
        ratio = row["seconds_per_iteration"] / single[row["defense"]] if row["defense"] in single else float("nan")
        row["cost_vs_gradient"] = ratio
        table.add_row(row["defense"], row["method"], row["setting"], f"{row['mean_ssim']:.3f}", f"{row['asr']:.2f}",
                      f"{row['seconds_per_iteration']:.4f}", f"{ratio:.1f}")
    Console(width=130).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "federated_updates", "victims": args.victims, "iterations": args.iterations,
        "local_lr": args.local_lr, "seed": args.seed, "machine": platform.platform(), "cpus": os.cpu_count(),
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

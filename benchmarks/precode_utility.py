"""What PRECODE costs: test accuracy and training-step time with and without it, side by side.

Trains each model twice on real digits (a safetensors file of images and labels, e.g. the MNIST
test set, split 80/20 by precode's fixed split: 8,000 / 2,000), once plain and once with PRECODE,
with the same seed, data order, optimiser and budget. The two runs of a model alternate epoch by
epoch, so machine load drifts onto both alike. Prints a table and writes JSON.

    python benchmarks/precode_utility.py --data ../shared/data/mnist-test.safetensors --epochs 10

Targets from issue 3: accuracy with PRECODE within 2 points of the plain model, step-time
overhead under 10%. The script reports what it measures, whether or not the targets hold.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from defenses import stack_from_cli
from precode_cli import __version__, data, models, training

ACCURACY_TARGET_POINTS = 2.0
OVERHEAD_TARGET = 0.10


def build_trainer(model_name: str, defense: str, args: argparse.Namespace, spec: dict, train_set, test_set,
                  device: torch.device) -> training.Trainer:
    torch.manual_seed(args.seed)  # same initial weights for the shared layers of both models
    stack = stack_from_cli(defense)
    model_spec = models.make_spec(model_name, tuple(spec["input_shape"]), spec["num_classes"])
    model = stack.build_model(model_spec)
    config = training.TrainConfig(epochs=0, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                                  seed=args.seed)
    return training.Trainer(model, stack.loss, train_set, test_set, spec, config, device)


def compare(model_name: str, args: argparse.Namespace, spec: dict, train_set, test_set,
            device: torch.device) -> dict:
    """Train plain and PRECODE versions of one model, alternating epochs."""
    trainers = {d: build_trainer(model_name, d, args, spec, train_set, test_set, device) for d in ("none", "precode")}
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = ("none", "precode") if epoch % 2 else ("precode", "none")  # neither always runs first
        for defense in order:
            trainer = trainers[defense]
            trainer.config.epochs = epoch
            torch.manual_seed(args.seed + epoch)  # PRECODE's noise; the plain model draws none
            trainer.run()
    result = {"model": model_name, "seconds": time.perf_counter() - started}
    for defense, trainer in trainers.items():
        warm = trainer.step_times[args.warmup_steps:] or trainer.step_times
        result[defense] = {
            "test_accuracy": trainer.history[-1]["test_accuracy"],
            "best_test_accuracy": max(row["test_accuracy"] for row in trainer.history),
            "step_ms_median": 1000 * statistics.median(warm),
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "history": trainer.history,
        }
    plain, vb = result["none"], result["precode"]
    result["accuracy_drop_points"] = 100 * (plain["test_accuracy"] - vb["test_accuracy"])
    result["step_time_overhead"] = vb["step_ms_median"] / plain["step_ms_median"] - 1
    result["meets_accuracy_target"] = result["accuracy_drop_points"] <= ACCURACY_TARGET_POINTS
    result["meets_overhead_target"] = result["step_time_overhead"] < OVERHEAD_TARGET
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="safetensors file with images and labels")
    parser.add_argument("--models", default="mlp,cnn,lenet")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of the step-time median")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=Path("precode_utility.json"))
    args = parser.parse_args()

    device = training.choose_device(args.device)
    spec = data.data_spec("tensors", args.data)
    train_set, test_set = data.load("tensors", "train", args.data), data.load("tensors", "test", args.data)
    console = Console(width=150)
    console.print(f"{len(train_set)} train / {len(test_set)} test images {spec['input_shape']}, "
                  f"{args.epochs} epochs, batch {args.batch_size}, {args.optimizer} lr {args.lr}, device {device}, "
                  f"{torch.get_num_threads()} threads")
    results = [compare(name, args, spec, train_set, test_set, device) for name in args.models.split(",")]

    table = Table(title=f"PRECODE's price on {args.data.name} ({device})")
    for column in ("model", "acc plain", "acc PRECODE", "drop (points)", "ms/step plain", "ms/step PRECODE",
                   "overhead", "params plain", "params PRECODE"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r["model"], f"{100 * r['none']['test_accuracy']:.2f}%", f"{100 * r['precode']['test_accuracy']:.2f}%",
            f"{r['accuracy_drop_points']:+.2f}", f"{r['none']['step_ms_median']:.2f}",
            f"{r['precode']['step_ms_median']:.2f}", f"{100 * r['step_time_overhead']:+.1f}%",
            f"{r['none']['parameters']:,}", f"{r['precode']['parameters']:,}",
        )
    console.print(table)
    report = {
        "benchmark": "precode_utility",
        "data": str(args.data),
        "train_images": len(train_set),
        "test_images": len(test_set),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "precode": __version__,
        "targets": {"accuracy_drop_points_at_most": ACCURACY_TARGET_POINTS, "step_time_overhead_below": OVERHEAD_TARGET},
        "results": results,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"Wrote {args.json}.")


if __name__ == "__main__":
    main()

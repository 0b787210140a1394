"""Leakage over training: test accuracy and attack success per epoch, one line per defense.

The PRECODE paper's central figure asks whether a defense keeps protecting while the model learns,
and what it costs. This script answers it for any defense with the `precode` command line only, as
a user's shell script would, one subprocess per stage:

1. `precode train --checkpoint-epochs N`: the model with the defense, and its test accuracy after
   each epoch (RUN_DIR/history.json);
2. `precode capture-gradients RUN_DIR --epoch E`: the same victims' gradients at each chosen epoch
   (epoch 0 is the untrained model);
3. `precode attack --method ig --preset fast`: Inverting Gradients on each epoch's dumps alone;
4. `precode evaluate`: one report per defense, the epochs side by side (mean SSIM, ASR).

It writes OUT/leakage_over_training.json and .csv (one row per defense and epoch) and
OUT/leakage_over_training.png (two panels: test accuracy and mean SSIM against the epoch). Every
file goes under --out: runs/, grads/, recon/ and reports/ hold each stage's files, one folder per
defense (and per epoch). The defaults took 9-13 minutes on a busy 2-core CPU and left 0.7 GB (MNIST) to
1.6 GB (built-in) under --out, mostly each epoch's model; docs/reproduction.md shows what they measured.

    python examples/leakage_over_training.py --out lot-builtin
    python examples/leakage_over_training.py --data mnist --mnist ../shared/data/mnist-test.safetensors --out lot-mnist
    python examples/leakage_over_training.py --epochs 10 --capture-epochs 0,2,5,10 --victims 16 --preset precode \\
        --defenses none,precode,noise:0.1 --out lot-big

A defense is `none`, `precode`, `noise:SCALE` (Gaussian noise of that standard deviation) or any other
`--defense` name of `precode train` with its default settings.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEFAULT_DEFENSES = "none,noise:1e-3,noise:1e-2,precode"
STEM = "leakage_over_training"
CSV_COLUMNS = ["data", "model", "defense", "epoch", "test_accuracy", "n", "mean_ssim", "asr", "label_accuracy",
               "mean_psnr", "report"]


class Failure(Exception):
    """A problem to report in one sentence, with exit code 2 (a bad option) or a failed command's own code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def defense_options(spec: str) -> list[str]:
    """`noise:1e-3` -> `--defense noise --noise-scale 1e-3`; `precode` -> `--defense precode`."""
    name, _, value = spec.partition(":")
    if not name or not name.replace("-", "").isalnum():
        raise Failure(f"--defenses: {spec!r} is not a defense; write none, precode, noise:SCALE or another name.")
    if not value:
        return ["--defense", name]
    if name != "noise":
        raise Failure(f"--defenses: only noise takes a value (noise:SCALE), not {spec!r}.")
    try:
        scale = float(value)
    except ValueError:
        scale = math.nan
    if not scale > 0 or math.isinf(scale):
        raise Failure(f"--defenses: the noise scale in {spec!r} must be a positive number.")
    return ["--defense", "noise", "--noise-scale", value]


def epoch_list(text: str, epochs: int) -> list[int]:
    """`0,2,4` -> [0, 2, 4]; empty: every epoch from 0 to --epochs."""
    if not text.strip():
        return list(range(epochs + 1))
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise Failure(f"--capture-epochs must be whole numbers separated by commas, not {text!r}.") from None
    if not chosen or chosen[0] < 0 or chosen[-1] > epochs:
        raise Failure(f"--capture-epochs must lie between 0 and --epochs ({epochs}), not {text!r}.")
    return chosen


def data_options(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The data's name in the table, and the options that point train at it."""
    if args.data == "builtin":
        return "builtin", ["--dataset", "builtin"]
    path = Path(args.mnist)
    if path.is_file():  # a safetensors file of images and labels, such as the MNIST test set (8,000 / 2,000 split)
        return "mnist", ["--dataset", "tensors", "--data-dir", str(path), "--stats", "mnist"]
    if path.is_dir():  # the four official IDX files
        return "mnist", ["--dataset", "mnist", "--data-dir", str(path)]
    raise Failure(f"--mnist {args.mnist} is neither a safetensors file nor a folder of MNIST's IDX files "
                  "(on the team's machines: ../shared/data/mnist-test.safetensors).")


class Pipeline:
    """Runs `precode` commands one after another, keeping each command line and its wall time for the record."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self.commands: list[dict[str, Any]] = []

    def __call__(self, command: str, *args: object) -> None:
        line = ["precode", command, *map(str, args)] + (["--force"] if self.force else [])
        print(f"== {shlex.join(line)}", file=sys.stderr, flush=True)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "precode_cli", *line[1:]], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "160"})
        self.commands.append({"command": shlex.join(line), "seconds": round(time.monotonic() - started, 2)})
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            said = lines[-1].removeprefix("Error: ") if lines else f"exit code {done.returncode}"
            raise Failure(f"precode {command} failed: {said}", done.returncode)


def run_defense(precode: Pipeline, spec: str, epochs: list[int], data: list[str], args: argparse.Namespace,
                out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train, capture at each epoch, attack and evaluate one defense: one row per epoch, and what the run recorded."""
    import yaml

    label = spec.replace(":", "-")
    run, report = out / "runs" / label, out / "reports" / label
    model = ["--model", args.model] + (["--width", args.width] if args.width else [])
    size = ["--image-size", args.image_size] if args.image_size else []
    subset = ["--subset", args.subset] if args.subset else []
    every = math.gcd(*epochs) or 1  # keep only the checkpoints the captures need
    precode("train", *data, *size, *subset, *model, *defense_options(spec), "--epochs", args.epochs,
            "--checkpoint-epochs", every, "--seed", args.seed, "--out", run)
    recons, grads = [], []
    for epoch in epochs:
        grad = out / "grads" / label / f"epoch-{epoch:04d}"
        recon = out / "recon" / label / f"epoch-{epoch:04d}"
        precode("capture-gradients", run, "--epoch", epoch, "--split", args.split, "--indices", f"0:{args.victims}",
                "--pick", "random", "--seed", args.seed, "--out", grad)
        iterations = ["--iterations", args.iterations] if args.iterations else []
        precode("attack", grad, "--method", "ig", "--preset", args.preset, *iterations, "--threads", args.threads,
                "--seed", args.seed, "--out", recon)
        grads.append(grad)
        recons.append(recon)
    truths = [option for grad in grads for option in ("--truth", grad)]
    precode("evaluate", *recons, *truths, "--threshold", args.threshold, "--out", report,
            "--note", f"Leakage over training ({STEM}.py): defense {spec}, epochs {', '.join(map(str, epochs))}.")
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    accuracy = {row["epoch"]: row["test_accuracy"] for row in history["epochs"]}
    groups = {Path(g["recon_dir"]).resolve(): g for g in json.loads((report / "metrics.json").read_text())["groups"]}
    rows = []
    for epoch, recon in zip(epochs, recons):
        group = groups[recon.resolve()]
        if group["model_state"] != f"epoch {epoch}":  # the truth files say which checkpoint the victims met
            raise Failure(f"{recon} holds reconstructions of the model at {group['model_state']}, "
                          f"not at epoch {epoch}.", 1)
        summary = group["summary"]
        rows.append({"defense": spec, "epoch": epoch, "test_accuracy": accuracy.get(epoch), "n": summary["n"],
                     "mean_ssim": summary["mean_ssim"], "asr": summary["asr"],
                     "label_accuracy": summary["label_accuracy"], "mean_psnr": summary["mean_psnr"],
                     "report": str(report.relative_to(out))})
    recorded = yaml.safe_load((run / "run.yaml").read_text(encoding="utf-8"))  # the defense with all its settings
    return rows, {"run": str(run.relative_to(out)), "defense": recorded["defense"], "tool": history.get("tool")}


def refuse_earlier_results(out: Path, force: bool) -> None:
    """Stop before any work when --out already holds this script's table (unless --force)."""
    from precode_cli import atomic
    from precode_cli.errors import UserError

    try:
        atomic.refuse_overwrite([out / f"{STEM}.{ext}" for ext in ("json", "csv", "png")], force)
    except UserError as refused:
        raise Failure(str(refused)) from None


def caption(spec: str) -> str:
    """How a defense is named in the figure's legend: `noise:1e-3` -> "noise, σ = 1e-3"."""
    from precode_cli.plots import plain_defense_name

    name, _, value = spec.partition(":")
    return plain_defense_name(name) + (f", σ = {value}" if value else "")


def write_outputs(out: Path, document: dict[str, Any], title: str) -> None:
    """The table as JSON and CSV, and the two-panel figure."""
    from precode_cli import atomic, plots

    # Written as the commands write theirs: to a temporary file, then renamed (never through a planted link).
    atomic.write_text(out / f"{STEM}.json", json.dumps(document, indent=2) + "\n")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in document["rows"]:
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in CSV_COLUMNS})
    atomic.write_text(out / f"{STEM}.csv", table.getvalue())
    series: dict[str, list[dict[str, Any]]] = {}
    for row in document["rows"]:
        series.setdefault(caption(row["defense"]), []).append(row)
    plots.leakage_over_training(series, out / f"{STEM}.png", title)


def print_table(rows: list[dict[str, Any]]) -> None:
    """The table on stdout, as the CLI's commands print theirs; status lines went to stderr."""
    print(f"{'defense':<14} {'epoch':>5} {'test acc':>9} {'mean SSIM':>10} {'ASR':>5}")
    for row in rows:
        accuracy = "-" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.2f}%"
        print(f"{row['defense']:<14} {row['epoch']:>5} {accuracy:>9} {row['mean_ssim']:>10.4f} {row['asr']:>5.2f}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for every file this script writes")
    parser.add_argument("--data", choices=["builtin", "mnist"], default="builtin")
    parser.add_argument("--mnist", default="../shared/data/mnist-test.safetensors",
                        help="with --data mnist: a safetensors file of images and labels, or a folder of the IDX files")
    parser.add_argument("--defenses", default=DEFAULT_DEFENSES, help="comma-separated: none, precode, noise:SCALE, ...")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--width", type=int, default=0, help="the model's width (0: its default)")
    parser.add_argument("--image-size", type=int, default=0, help="resize images (0: the dataset's own)")
    parser.add_argument("--subset", type=int, default=2000, help="train on this many images (0: the whole split)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--capture-epochs", default="",
                        help="comma-separated epochs to attack (default: every epoch, 0 .. --epochs)")
    parser.add_argument("--victims", type=int, default=4, help="victims per epoch, one image per gradient")
    parser.add_argument("--split", choices=["train", "test"], default="train", help="the split the victims come from")
    parser.add_argument("--preset", choices=["fast", "precode", "geiping"], default="fast",
                        help="the ig attack's preset")
    parser.add_argument("--iterations", type=int, default=0, help="override the preset's iterations (0: keep them)")
    parser.add_argument("--threads", type=int, default=1, help="the attack's CPU threads")
    parser.add_argument("--threshold", type=float, default=0.6, help="SSIM at which a victim counts as recovered")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="pass --force to every command (replace earlier outputs)")
    args = parser.parse_args(argv)
    for name in ("epochs", "victims", "threads"):
        if getattr(args, name) < 1:
            raise Failure(f"--{name} must be at least 1.")
    if min(args.width, args.image_size, args.subset, args.iterations) < 0:
        raise Failure("--width, --image-size, --subset and --iterations must not be negative.")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        epochs = epoch_list(args.capture_epochs, args.epochs)
        specs = [spec.strip() for spec in args.defenses.split(",") if spec.strip()]
        if not specs or len(set(specs)) < len(specs):
            raise Failure("--defenses must name at least one defense, each once.")
        for spec in specs:
            defense_options(spec)
        data_name, data = data_options(args)
        out = args.out
        refuse_earlier_results(out, args.force)
        out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        precode = Pipeline(args.force)
        rows, runs = [], {}
        for spec in specs:
            defense_rows, runs[spec] = run_defense(precode, spec, epochs, data, args, out)
            rows += [{"data": data_name, "model": args.model, **row} for row in defense_rows]
    except Failure as failure:
        print(f"Error: {failure}", file=sys.stderr)
        return failure.code
    except KeyboardInterrupt:
        print("Stopped; run again with --force to start over.", file=sys.stderr)
        return 130
    seconds = time.monotonic() - started
    config = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    document = {"experiment": STEM, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seed": args.seed, "config": config, "epochs": epochs, "tool": runs[specs[-1]]["tool"],
                "seconds": round(seconds, 1), "commands": precode.commands, "runs": runs, "rows": rows}
    attack = f"{args.preset} preset" + (f", {args.iterations} iterations" if args.iterations else "")
    victims = f"{args.victims} victim{'s' if args.victims > 1 else ''}"
    title = f"Leakage over training: {args.model} on {data_name}, {victims} per epoch, Inverting Gradients ({attack})"
    write_outputs(out, document, title)
    print_table(rows)
    print(f"Wrote {out / STEM}.json, .csv and .png ({seconds:.0f} s).", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

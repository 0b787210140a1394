"""What each defense costs and what it protects: accuracy, step time, and leakage under four attacks.

For each model and each defense setting, on real digits (a safetensors file of images and labels,
e.g. the MNIST test set, split 80/20 by precode's fixed split: 8,000 / 2,000):

1. `precode train` with the defense (same seed, data order and budget for every setting): the
   test accuracy after the budget and the median time of a training step (last epoch; the
   defense acts in every step, so clipping, pruning and Soteria's scoring are part of it);
2. `precode capture-gradients` of the first `--victims` held-out images, one per dump, from the
   trained model: what the client shares, through the same code as training;
3. each attack on those dumps, read back from disk as `precode attack` reads them, on `--device`:
   `ig` and `ig-adaptive` (all victims at once), `analytic` and `dlg` (one by one); a method
   that does not apply (ig-adaptive without a bottleneck, analytic on a conv model) is "n/a";
4. SSIM of every reconstruction against its original in [0, 1] pixel space, and the attack
   success rate (SSIM >= --threshold).

Prints the table, writes JSON after every setting (a rerun with --only adds to it), and with
--markdown prints the table as docs/defenses.md shows it, from one or more JSON files.

Step times are only comparable when measured alone on a quiet machine. --timing-only trains each
setting for one epoch, one after the other, and records nothing but the median step time; when
such a file is given to --markdown, its step times replace those of the full runs (so settings
run in parallel processes still get step times measured side by side in one quiet pass).

    python benchmarks/defense_tradeoff.py --data ../shared/data/mnist-test.safetensors
    python benchmarks/defense_tradeoff.py --data ... --models cnn --only noise,dp --json tradeoff.json
    python benchmarks/defense_tradeoff.py --data ... --timing-only --json timing.json
    python benchmarks/defense_tradeoff.py --markdown --json tradeoff.json --json timing.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

import attacks
from attacks.inverting_gradients import InvertingGradients
from precode_cli import __version__, data, fileformat, metrics
from precode_cli.app import app
from precode_cli.cli_support import tune_allocator
from precode_cli.errors import UserError
from precode_cli.stages.attack import target_from_dump

# (label, --defense names, defense options): each defense at two or three strengths.
SETTINGS: list[tuple[str, list[str], dict[str, Any]]] = [
    ("none", [], {}),
    ("precode", ["precode"], {}),
    ("noise 1e-3", ["noise"], {"noise_scale": 1e-3}),
    ("noise 1e-2", ["noise"], {"noise_scale": 1e-2}),
    ("noise 1e-1", ["noise"], {"noise_scale": 1e-1}),
    ("prune keep 0.5", ["prune"], {"prune_keep": 0.5}),
    ("prune keep 0.1", ["prune"], {"prune_keep": 0.1}),
    ("prune keep 0.01", ["prune"], {"prune_keep": 0.01}),
    ("dp sigma 0.1", ["dp"], {"dp_clip": 1.0, "dp_sigma": 0.1}),
    ("dp sigma 0.5", ["dp"], {"dp_clip": 1.0, "dp_sigma": 0.5}),
    ("dp sigma 1", ["dp"], {"dp_clip": 1.0, "dp_sigma": 1.0}),
    ("soteria 10%", ["soteria"], {"soteria_percent": 10}),
    ("soteria 40%", ["soteria"], {"soteria_percent": 40}),
    ("soteria 80%", ["soteria"], {"soteria_percent": 80}),
    ("ppp sigma 0.01", ["ppp"], {"ppp_clip": 1.0, "ppp_sigma": 0.01}),
    ("ppp sigma 0.1", ["ppp"], {"ppp_clip": 1.0, "ppp_sigma": 0.1}),
    ("ppp sigma 1", ["ppp"], {"ppp_clip": 1.0, "ppp_sigma": 1.0}),
    ("cvb", ["cvb"], {}),
    ("cvb, authors' KL", ["cvb"], {"cvb_kl": "authors"}),
]
CONV_ONLY = {"cvb"}  # defenses refused on a model without convolutions (mlp)
ATTACKS = ("ig", "ig-adaptive", "analytic", "dlg")


def cli(*args: object) -> None:
    """Run a precode command in-process (no start-up cost per setting); stop the benchmark if it fails."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    if result.exit_code != 0:
        raise SystemExit(f"precode {' '.join(map(str, args))} failed:\n{result.output}")


def flags(names: list[str], options: dict[str, Any]) -> list[str]:
    """The command-line form of a setting's defense."""
    out = [item for name in names for item in ("--defense", name)] or ["--defense", "none"]
    for key, value in options.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def train_and_capture(model: str, label: str, names: list[str], options: dict[str, Any], args: argparse.Namespace,
                      work: Path) -> tuple[dict[str, Any], list[Path]]:
    """Train with the defense, capture the victims' dumps; the run's figures and the dump paths."""
    run, grads = work / "run", work / "grads"
    started = time.perf_counter()
    cli("train", "--dataset", "tensors", "--data-dir", args.data, "--model", model, *flags(names, options),
        "--epochs", args.epochs, "--batch-size", args.batch_size, "--lr", args.lr, "--seed", args.seed,
        "--device", args.device, "--out", run)
    trained = time.perf_counter() - started
    cli("capture-gradients", run, "--split", "test", "--indices", f"0:{args.victims}", "--batch-size", 1,
        "--seed", args.seed, "--out", grads)
    history = json.loads((run / "history.json").read_text())
    last = history["epochs"][-1]
    figures = {
        "model": model, "setting": label, "defense": names or ["none"], "options": options,
        "test_accuracy": history["test_accuracy"], "step_ms_median": 1000 * last["step_seconds_median"],
        "train_seconds": trained, "privacy": history.get("privacy"),
    }
    return figures, sorted(grads.glob("test-*[0-9].safetensors"))


def load_targets(dumps: list[Path], device: torch.device) -> tuple[list[attacks.AttackTarget], torch.Tensor, dict]:
    """The attacker's view of each dump (as `precode attack` builds it) on `device`, the originals, the data spec."""
    targets, originals, spec = [], [], {}
    for dump in dumps:
        stored = fileformat.read(dump, "gradients")
        target = target_from_dump(stored, dump)
        target.model.to(device)
        target.shared_grads = [g.to(device) for g in target.shared_grads]
        target.labels = target.labels.to(device) if target.labels is not None else None
        target.lower, target.upper = target.lower.to(device), target.upper.to(device)
        targets.append(target)
        truth = fileformat.read(dump.with_name(dump.name.replace(".safetensors", ".truth.safetensors")), "truth")
        originals.append(truth.tensors["images"])
        spec = stored.meta["data"]
    return targets, torch.cat(originals), spec


def attack_all(method: str, targets: list[attacks.AttackTarget], args: argparse.Namespace) -> torch.Tensor | None:
    """Reconstructions [V, C, H, W] (normalised) of every target, or None where the method does not apply."""
    options = {"iterations": args.ig_iterations} if method.startswith("ig") else {}
    if method == "dlg":
        options = {"iterations": args.dlg_iterations}
    attack = attacks.create(method, **options)
    try:
        attack.check(targets[0])
    except UserError:
        return None
    if isinstance(attack, InvertingGradients):
        results = attack.run_many(targets, args.seed)
    else:
        results = [attack.run(target, args.seed) for target in targets]
    return torch.cat([r.inputs.detach().cpu() for r in results])


def score(recon: torch.Tensor, originals: torch.Tensor, spec: dict, threshold: float) -> dict[str, float]:
    pixels = data.denormalize(recon, spec).clamp(0, 1)
    ssim = metrics.ssim(pixels, originals)
    ssim = torch.nan_to_num(ssim, nan=0.0)
    return {"ssim_mean": float(ssim.mean()), "asr": float((ssim >= threshold).float().mean()),
            "ssim_per_victim": [round(float(v), 4) for v in ssim]}


def run_setting(model: str, label: str, names: list[str], options: dict[str, Any], args: argparse.Namespace,
                device: torch.device, console: Console) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="defense-tradeoff-") as tmp:
        figures, dumps = train_and_capture(model, label, names, options, args, Path(tmp))
        targets, originals, spec = load_targets(dumps, device)
        figures["attacks"] = {}
        for method in args.attacks.split(","):
            started = time.perf_counter()
            recon = attack_all(method, targets, args)
            if recon is None:
                figures["attacks"][method] = None
                continue
            figures["attacks"][method] = {**score(recon, originals, spec, args.threshold),
                                          "seconds": time.perf_counter() - started}
    cells = "  ".join(f"{m} {_cell(figures['attacks'][m])}" for m in figures["attacks"])
    console.print(f"{model:5} {label:16} acc {100 * figures['test_accuracy']:.2f}%  "
                  f"{figures['step_ms_median']:.2f} ms/step  {cells}")
    return figures


def time_setting(model: str, label: str, names: list[str], options: dict[str, Any], args: argparse.Namespace,
                 console: Console) -> dict[str, Any]:
    """One epoch of training with the defense; its median step time."""
    with tempfile.TemporaryDirectory(prefix="defense-timing-") as tmp:
        cli("train", "--dataset", "tensors", "--data-dir", args.data, "--model", model, *flags(names, options),
            "--epochs", 1, "--batch-size", args.batch_size, "--lr", args.lr, "--seed", args.seed,
            "--device", args.device, "--out", Path(tmp) / "run")
        history = json.loads((Path(tmp) / "run" / "history.json").read_text())
    step_ms = 1000 * history["epochs"][-1]["step_seconds_median"]
    console.print(f"{model:5} {label:16} {step_ms:.2f} ms/step")
    return {"model": model, "setting": label, "timing_only": True, "step_ms_median": step_ms}


def combined(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Full runs' rows from several files, with the step times of --timing-only files where given."""
    full = [r for report in reports if not report["settings"].get("timing_only") for r in report["results"]]
    timing = {(r["model"], r["setting"]): r["step_ms_median"]
              for report in reports if report["settings"].get("timing_only") for r in report["results"]}
    rows = {(r["model"], r["setting"]): r for r in full}
    for key, step_ms in timing.items():
        if key in rows:
            rows[key] = {**rows[key], "step_ms_median": step_ms}
    base = next((r for r in reports if not r["settings"].get("timing_only")), reports[0])
    models = list(dict.fromkeys(r["model"] for r in full))  # in the order the files name them
    return {**base, "results": sorted(rows.values(), key=lambda r: (models.index(r["model"]), _table_order(r)))}


def _table_order(row: dict[str, Any]) -> tuple[str, int]:
    labels = [label for label, _, _ in SETTINGS]
    return row["model"], labels.index(row["setting"]) if row["setting"] in labels else len(labels)


def _cell(result: dict[str, Any] | None) -> str:
    return "n/a" if result is None else f"{result['ssim_mean']:.3f} / {result['asr']:.2f}"


def _epsilon(row: dict[str, Any]) -> str:
    privacy = row.get("privacy")
    return f"{privacy['epsilon']:.3g}" if privacy else ""


def print_table(report: dict[str, Any], console: Console, markdown: bool) -> None:
    rows = report["results"]
    methods = report["settings"]["attacks"].split(",")
    columns = ["model", "defense", "test acc", "ms/step", "epsilon"] + [f"{m} SSIM / ASR" for m in methods]
    lines = [[r["model"], r["setting"], f"{100 * r['test_accuracy']:.2f}%", f"{r['step_ms_median']:.2f}",
              _epsilon(r)] + [_cell(r["attacks"].get(m)) for m in methods] for r in rows]
    if markdown:
        console.print("| " + " | ".join(columns) + " |", soft_wrap=True)
        console.print("|" + "---|" * len(columns), soft_wrap=True)
        for line in lines:
            console.print("| " + " | ".join(line) + " |", soft_wrap=True)
        return
    table = Table(title=f"defenses: price and protection ({report['device_name']})")
    for column in columns:
        table.add_column(column, justify="right")
    for line in lines:
        table.add_row(*line)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="safetensors file with images and labels (e.g. the MNIST test set)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--only", default="", help="comma-separated setting names or prefixes (e.g. noise,dp sigma 1)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--victims", type=int, default=8)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--ig-iterations", type=int, default=2000)
    parser.add_argument("--dlg-iterations", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=0.6, help="SSIM at or above which an attack succeeds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="for training and the attacks (capture runs on the CPU)")
    parser.add_argument("--json", type=Path, action="append", help="output file (default defense_tradeoff.json); "
                        "with --markdown, the files to read (repeat)")
    parser.add_argument("--markdown", action="store_true", help="only print the table of the --json files as Markdown")
    parser.add_argument("--timing-only", action="store_true", help="only the median step time of one epoch per setting")
    args = parser.parse_args()
    console = Console(width=200)
    if args.markdown:
        print_table(combined([json.loads(path.read_text()) for path in args.json or []]), console, markdown=True)
        return
    args.json = (args.json or [Path("defense_tradeoff.json")])[-1]
    if args.data is None:
        parser.error("--data is required unless --markdown")
    tune_allocator()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    args.device = device.type
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("only", "markdown")}
    report = {"benchmark": "defense_tradeoff", "results": []}
    if args.json.exists():  # add to an earlier run of the same settings (e.g. another --only)
        earlier = json.loads(args.json.read_text())
        if earlier.get("settings") == settings:
            report = earlier
    report.update({
        "settings": settings, "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": str(torch.__version__), "precode": __version__,
    })
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    for model in args.models.split(","):
        for label, names, options in SETTINGS:
            if wanted and not any(label == w or label.startswith(w) for w in wanted):
                continue
            if model == "mlp" and CONV_ONLY & set(names):
                continue
            if args.timing_only:
                row = time_setting(model, label, names, options, args, console)
            else:
                row = run_setting(model, label, names, options, args, device, console)
            report["results"] = [r for r in report["results"] if (r["model"], r["setting"]) != (model, label)] + [row]
            report["results"].sort(key=_table_order)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not args.timing_only:
        print_table(report, console, markdown=False)
    console.print(f"Wrote {args.json}.")


if __name__ == "__main__":
    main()

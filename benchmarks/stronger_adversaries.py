"""Which verdicts change once the stronger adversaries are in: batch size x defense x attack.

For every batch size and defense it runs the real pipeline through the CLI, as a user would, on
built-in victims (picked at random by the seed) of an untrained conv model (`cnn` by default, so
that `cvb` applies):
- `imprint`: the malicious server's threat model. `capture-gradients --threat imprint` puts the
  server's binning module in front of the model; `attack --method imprint` reads images off it.
- `ig`: the honest-but-curious server. `capture-gradients` of the plain model, then Inverting
  Gradients with the fast preset, at the batch sizes of --ig-batches (it costs far more per image).
Then `evaluate` gives the mean SSIM and the attack success rate (SSIM >= --threshold). `ig-bn`
needs BatchNorm statistics, which `cnn` has none of: benchmarks/bn_prior.py measures it on resnet18.
Prints a table and writes JSON.

    python benchmarks/stronger_adversaries.py --out /tmp/stronger
    python benchmarks/stronger_adversaries.py --batches 8 --defenses none,cvb --ig-iterations 200 --out /tmp/s
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
from cli_runs import precode  # noqa: E402  (the benchmarks folder is not a package)

ROOT = Path(__file__).resolve().parent.parent


def summary_of(report: Path) -> dict:
    return json.loads((report / "metrics.json").read_text())["groups"][0]["summary"]


def run_cell(out: Path, batch: int, defense: str, attack: str, args: argparse.Namespace) -> dict:
    """One (batch, defense, attack): capture, attack, evaluate; the report's mean SSIM and ASR."""
    folder = out / f"b{batch}-{defense}-{attack}"
    grads, recon, report = folder / "grads", folder / "recon", folder / "report"
    victims = args.victims if attack == "imprint" else args.ig_victims
    victims = max(batch, victims - victims % batch)
    threat = ["--threat", "imprint"] if attack == "imprint" else []
    method = ["--method", "imprint"] if attack == "imprint" else [
        "--method", "ig", "--preset", "fast", "--iterations", args.ig_iterations, "--threads", 1]
    started = time.perf_counter()
    precode("capture-gradients", "--model", args.model, "--defense", defense, *threat, "--batch-size", batch,
            "--indices", f"0:{victims}", "--pick", "random", "--seed", args.seed, "--out", grads, "--force")
    precode("attack", grads, *method, "--seed", args.seed, "--out", recon, "--force")
    precode("evaluate", recon, "--truth", grads, "--threshold", args.threshold, "--out", report, "--force")
    summary = summary_of(report)
    return {"batch_size": batch, "defense": defense, "attack": attack, "victims": summary["n"],
            "mean_ssim": summary["mean_ssim"], "asr": summary["asr"], "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batches", default="8,32,64")
    parser.add_argument("--ig-batches", default="8", help="batch sizes at which ig runs too")
    parser.add_argument("--defenses", default="none,precode,cvb,dp")
    parser.add_argument("--victims", type=int, default=64, help="victims per imprint cell (whole batches)")
    parser.add_argument("--ig-victims", type=int, default=8, help="victims per ig cell (whole batches)")
    parser.add_argument("--ig-iterations", type=int, default=1000)
    parser.add_argument("--threshold", type=float, default=0.6, help="SSIM at or above which an image is recovered")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/precode-stronger-adversaries"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "stronger_adversaries.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    ig_batches = {int(b) for b in args.ig_batches.split(",") if b}
    rows = []
    for batch in batches:
        for defense in [d for d in args.defenses.split(",") if d]:
            for attack in ["imprint"] + (["ig"] if batch in ig_batches else []):
                rows.append(run_cell(args.out, batch, defense, attack, args))
                print(json.dumps(rows[-1]), flush=True)
    table = Table(title=f"stronger adversaries: untrained {args.model}, built-in data, ASR = SSIM >= {args.threshold}")
    for column in ("batch", "defense", "attack", "victims", "mean SSIM", "ASR"):
        table.add_column(column, justify="left" if column in ("defense", "attack") else "right")
    for row in rows:
        table.add_row(str(row["batch_size"]), row["defense"], row["attack"], str(row["victims"]),
                      f"{row['mean_ssim']:.3f}", f"{row['asr']:.2f}")
    Console(width=120).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from precode_cli import __version__
    args.json.write_text(json.dumps({
        "benchmark": "stronger_adversaries", "precode": __version__, "seed": args.seed,
        "settings": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(), "cpus": os.cpu_count(),
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

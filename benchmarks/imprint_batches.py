"""The imprint attack of a malicious server against the batch size: how many images come back.

For every batch size and defense it runs the real pipeline through the CLI, as a user would:
`capture-gradients --threat imprint --batch-size B` on V built-in victims (picked at random by the
seed) of an untrained MLP, `attack --method imprint` and `evaluate --threshold 0.9`. An image counts
as recovered when its SSIM against the original is at least 0.9 (the attack success rate at 0.9);
images that share a bin come back as a mixture or not at all. Prints a table and writes JSON.

    python benchmarks/imprint_batches.py --victims 128 --out /tmp/imprint-bench
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
THRESHOLD = 0.9


def _from_bins(recon: Path) -> int:
    """Reconstructions read off a bin (the others are the mean image), summed over the files: each file's note
    begins with the number of bins that held images, and at most its batch of them are kept."""
    from safetensors import safe_open

    total = 0
    for path in sorted(recon.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            found = int(json.loads(meta["attack"])["note"].split(" ", 1)[0])
            total += min(found, int(json.loads(meta["data"])["batch_size"]))
    return total


def run_setting(out: Path, batch: int, defense: str, args: argparse.Namespace) -> dict:
    folder = out / f"b{batch}-{defense}"
    grads, recon, report = folder / "grads", folder / "recon", folder / "report"
    bins = ["--imprint-bins", str(args.bins)] if args.bins else []
    started = time.perf_counter()
    precode("capture-gradients", "--model", "mlp", "--defense", defense, "--threat", "imprint", *bins,
            "--batch-size", batch, "--indices", f"0:{args.victims}", "--pick", "random", "--seed", args.seed,
            "--out", grads, "--force")
    precode("attack", grads, "--method", "imprint", "--seed", args.seed, "--out", recon, "--force")
    precode("evaluate", recon, "--truth", grads, "--threshold", THRESHOLD, "--out", report, "--force")
    summary = json.loads((report / "metrics.json").read_text())["groups"][0]["summary"]
    return {"batch_size": batch, "defense": defense, "dumps": args.victims // batch, "victims": summary["n"],
            "bins": args.bins or max(128, 2 * batch), "from_bins": _from_bins(recon), "mean_ssim": summary["mean_ssim"],
            "recovered": summary["asr"], "label_accuracy": summary["label_accuracy"],
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", type=int, default=128, help="victims per setting (a multiple of every batch)")
    parser.add_argument("--batches", default="8,32,64")
    parser.add_argument("--defenses", default="none,precode")
    parser.add_argument("--bins", type=int, default=None, help="--imprint-bins (default: capture's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/precode-imprint-bench"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "imprint_batches.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    if any(args.victims % b for b in batches):
        raise SystemExit(f"--victims {args.victims} must be a multiple of every batch size ({args.batches}).")
    rows = []
    for batch in batches:
        for defense in [d for d in args.defenses.split(",") if d]:
            rows.append(run_setting(args.out, batch, defense, args))
            print(json.dumps(rows[-1]), flush=True)
    table = Table(title=f"imprint attack (malicious server): untrained MLP, built-in data, {args.victims} victims per "
                        f"row, recovered = SSIM >= {THRESHOLD}")
    for column in ("batch", "defense", "bins", "read off a bin", "mean SSIM", "recovered", "label acc"):
        table.add_column(column, justify="left" if column == "defense" else "right")
    for row in rows:
        table.add_row(str(row["batch_size"]), row["defense"], str(row["bins"]),
                      f"{row['from_bins']} / {row['victims']}", f"{row['mean_ssim']:.3f}", f"{row['recovered']:.2f}",
                      f"{row['label_accuracy']:.2f}")
    Console(width=130).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "imprint_batches", "victims": args.victims, "threshold": THRESHOLD, "seed": args.seed,
        "threads": os.environ.get("OMP_NUM_THREADS"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

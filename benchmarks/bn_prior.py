"""BatchNorm statistics as a prior: `ig` against `ig-bn` on an untrained ResNet-18 with BatchNorm.

For every batch size it runs the real pipeline through the CLI, as a user would:
`capture-gradients --model resnet18 --norm batch --record-bn-stats` on built-in victims (32-pixel,
no download), then `attack` with `ig` and with `ig-bn` (one or more `--bn-weight`s) on the same dumps,
the same seed and the same settings, and `evaluate`. `ig` ignores the recorded statistics, so the
difference is the prior alone. Prints a table and writes JSON. Runs on one thread, a few minutes per
batch size at the defaults on a 2-core CPU (ResNet-18 costs about half a second per dump and iteration).

    python benchmarks/bn_prior.py                          # batch sizes 1 and 8, 200 iterations
    python benchmarks/bn_prior.py --batch-sizes 32 --iterations 100 --json /tmp/bn32.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_runs import precode, recorded_seconds  # noqa: E402  (the benchmarks folder is not a package)

ROOT = Path(__file__).resolve().parent.parent


def run_attack(grads: Path, folder: Path, method: str, weight: float | None, args: argparse.Namespace) -> dict:
    recon, report = folder / "recon", folder / "report"
    extra = ["--bn-weight", weight] if weight is not None else []
    precode("attack", grads, "--method", method, *extra, "--preset", args.preset, "--iterations", args.iterations,
            "--threads", args.threads, "--seed", args.seed, "--out", recon, "--force")
    seconds = sum(recorded_seconds(path) for path in sorted(recon.glob("*.safetensors")))
    precode("evaluate", recon, "--truth", grads, "--out", report, "--force")
    summary = json.loads((report / "metrics.json").read_text())["groups"][0]["summary"]
    return {"method": method, "bn_weight": weight, "images": summary["n"], "mean_ssim": summary["mean_ssim"],
            "mean_psnr": summary["mean_psnr"], "asr": summary["asr"], "attack_seconds": seconds,
            "seconds_per_dump_iteration": seconds / args.iterations / len(list(recon.glob("*.safetensors")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated client batch sizes")
    parser.add_argument("--victims", type=int, default=4,
                        help="dumps at batch size 1; a batch size B gets max(1, victims // B) dumps")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--preset", default="geiping", help="the ig preset (lr 0.1, TV 1e-4), cut to --iterations")
    parser.add_argument("--bn-weights", default="0.01", help="comma-separated --bn-weight values for ig-bn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/precode-bn-prior-bench"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "bn_prior.json")
    args = parser.parse_args()
    from precode_cli.cli_support import tool_info  # the precode, torch and python versions

    weights = [float(w) for w in args.bn_weights.split(",") if w]
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",") if b]:
        dumps = max(1, args.victims // batch)
        grads = args.out / f"batch-{batch}" / "grads"
        precode("capture-gradients", "--model", "resnet18", "--norm", "batch", "--indices", f"0:{dumps * batch}",
                "--batch-size", batch, "--pick", "random", "--record-bn-stats", "--seed", args.seed,
                "--out", grads, "--force")
        for method, weight in [("ig", None), *[("ig-bn", w) for w in weights]]:
            folder = args.out / f"batch-{batch}" / (method if weight is None else f"{method}-{weight:g}")
            rows.append({"batch_size": batch, "dumps": dumps, **run_attack(grads, folder, method, weight, args)})
            print(json.dumps(rows[-1]), flush=True)
    table = Table(title=f"ig vs ig-bn: untrained resnet18 (BatchNorm), built-in 32-pixel data, --preset "
                        f"{args.preset} cut to {args.iterations} iterations, seed {args.seed}, "
                        f"{args.threads} thread(s)")
    for column in ("batch", "images", "attack", "--bn-weight", "mean SSIM", "mean PSNR", "ASR", "s / dump-iter"):
        table.add_column(column, justify="left" if column == "attack" else "right")
    for row in rows:
        table.add_row(str(row["batch_size"]), str(row["images"]), row["method"],
                      "" if row["bn_weight"] is None else f"{row['bn_weight']:g}", f"{row['mean_ssim']:.3f}",
                      f"{row['mean_psnr']:.1f}", f"{row['asr']:.2f}", f"{row['seconds_per_dump_iteration']:.2f}")
    Console(width=130).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "bn_prior", "model": "resnet18 --norm batch (untrained)", "dataset": "builtin",
        "preset": args.preset, "iterations": args.iterations, "seed": args.seed, "threads": args.threads,
        "machine": platform.platform(), "cpus": os.cpu_count(), "tool": tool_info(), "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

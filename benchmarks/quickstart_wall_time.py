"""The quick start's wall time, this tree against another (an older commit), alternating in one run.

Runs `examples/quickstart.sh` of each tree in turn, `--rounds` times, each in its own temporary
folder, with the tree's own code (`python -m precode_cli` from inside the tree), and reports the
median wall time of each, their ratio, and both runs' verdicts (mean SSIM of the plain and the
PRECODE model) so that a faster quick start is seen to tell the same story. Prints a table and
writes JSON.

    git worktree add /tmp/before <commit>   # or: git archive <commit> | tar -x -C /tmp/before
    python benchmarks/quickstart_wall_time.py --before /tmp/before --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent


def run_quickstart(tree: Path) -> dict:
    """One quick start of `tree`'s code; its wall time and the report's mean SSIM per defense."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "quickstart-out"
        env = {**os.environ, "PRECODE": f"{sys.executable} -m precode_cli", "PYTHON": sys.executable}
        started = time.perf_counter()
        done = subprocess.run(["bash", "examples/quickstart.sh", str(out)], cwd=tree, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"the quick start of {tree} failed:\n{done.stderr[-2000:]}")
        groups = json.loads((out / "report" / "metrics.json").read_text())["groups"]
        return {"seconds": seconds, "ssim": {g["defense"]: g["summary"]["mean_ssim"] for g in groups}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the tree to compare with (an older commit)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "quickstart_wall_time.json")
    args = parser.parse_args()
    if not (args.before / "examples" / "quickstart.sh").is_file():
        raise SystemExit(f"{args.before} holds no examples/quickstart.sh; pass a checkout of an older commit.")
    trees = {"before": args.before.resolve(), "after": ROOT}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(run_quickstart(tree))
            print(name, json.dumps(runs[name][-1]), flush=True)
    median = {name: statistics.median(r["seconds"] for r in results) for name, results in runs.items()}
    table = Table(title=f"examples/quickstart.sh, wall time, median of {args.rounds} alternating rounds")
    for column in ("tree", "median s", "runs (s)", "plain SSIM", "PRECODE SSIM"):
        table.add_column(column)
    for name, results in runs.items():
        table.add_row(name, f"{median[name]:.1f}", ", ".join(f"{r['seconds']:.1f}" for r in results),
                      f"{results[-1]['ssim']['none']:.4f}", f"{results[-1]['ssim']['precode']:.4f}")
    Console(width=120).print(table)
    print(f"before / after: {median['before'] / median['after']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "quickstart_wall_time", "rounds": args.rounds, "machine": platform.platform(),
        "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "before": str(trees["before"]),
        "median_seconds": median, "ratio_before_over_after": median["before"] / median["after"], "runs": runs,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

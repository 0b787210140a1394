"""precode's Inverting Gradients engine side by side with inversefed's `GradientReconstructor`, in one process.

What: victim-iterations per second of the same gradient-inversion attack done two ways, on the same
untrained victims with the same settings: by inversefed (Jonas Geiping's original Inverting Gradients
code, github.com/JonasGeiping/invertinggradients), which attacks one shared gradient at a time, so V
victims are V reconstructions one after another; and by precode's `attacks.optimization.match_gradients`,
which attacks all V at once (as `precode attack --vectorize V` does). Models: the PRECODE paper's MLP
without a defense, the same MLP with PRECODE, and DLG's LeNet; 1, 8 and 32 victims.

Why: precode claims its vectorised engine is much faster than the reference implementation (targets:
>= 10x on the MLP and >= 3x on LeNet at 32 victims). Measuring both in one process, alternating
[inversefed, precode] rounds and taking medians, keeps the machine's load off the ratio.

Settings, identical on both sides (the PRECODE paper's preset, `MatchingConfig`'s defaults): Adam on the
sign of the input gradient, lr 0.01, cosine distance over all parameters, total variation 1e-6, inputs
boxed to the valid pixel range, lr x0.1 at 3/8, 5/8 and 7/8 of the iterations, N(0, 1) start, one
restart, one image per victim, labels known. In inversefed that is the config dict `inversefed_config`
builds, with the built-in data's per-channel mean and std as `mean_std`. The iteration count is small
(`--iterations`) since only the rate matters; both sides' timings include their per-run setup.

Same computation, on purpose:
- Model mode: precode attacks in the capture's mode (train, the default; `make_targets` builds the
  victims in train mode); inversefed's `reconstruct` calls `model.eval()` unless `eval=False`, so it is
  called with `eval=False`. (These three models have no BatchNorm or Dropout, and PRECODE's bottleneck
  samples in either mode, so the mode changes nothing here; it also keeps inversefed from switching the
  shared victim models to eval mode under precode's feet.)
- Client loss: inversefed matches the gradient of `CrossEntropyLoss(reduction='mean')`; precode matches the
  gradient of the client's loss, which for PRECODE adds beta * KL of the bottleneck. The reconstructor's
  `loss_fn` attribute is therefore set to the victim's own loss (plain mean cross-entropy without a defense,
  i.e. the same as inversefed's own; cross-entropy + beta * KL with PRECODE).
- PRECODE's noise: inversefed's forward draws fresh noise from torch's global generator each step; precode
  draws it from its own per-restart generator. Same distribution, different draws.
- `--check-iterations K` (default 5) runs one victim per model for K iterations with inversefed started
  from precode's start (both are seed 0 of the default Mersenne Twister; for PRECODE a forward pre-hook
  hands the bottleneck precode's replay draws) and compares the per-iteration matching loss (inversefed's
  module-level `reconstruction_costs` is wrapped while the check runs, to record it) and the final inputs.
- inversefed's extra costs are part of it: `rec_loss.backward()` also back-propagates into the model's
  parameters, it scores the result with one more gradient, and it prints (its stdout is swallowed here).

Getting inversefed (read-only, never vendored into this repository):

    git clone https://github.com/JonasGeiping/invertinggradients /tmp/invertinggradients
    # or, from a bare mirror MIRROR (then pass --inversefed-git-dir MIRROR to record the commit):
    mkdir /tmp/invertinggradients && git --git-dir=MIRROR archive HEAD | tar -x -C /tmp/invertinggradients

Import work-around: `import inversefed` runs the package's `__init__`, which imports its data module, which
needs `six` (not a precode dependency). The benchmark therefore puts a bare package object named
`inversefed` (its `__path__` pointing into the folder, its `__init__` not run) into `sys.modules` and
imports `inversefed.reconstruction_algorithms` from it, which pulls in only `inversefed.nn`, `metrics`,
`medianfilt`, `consts` and `utils` (torch, torchvision, numpy). No module is stubbed and nothing is patched
for the timed runs. If the plain `import inversefed` works, that is used instead.

    python benchmarks/inversefed_side_by_side.py --inversefed /tmp/invertinggradients \\
        --inversefed-git-dir /work/.mirror/JonasGeiping+invertinggradients/repo
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: make_targets

from attack_throughput import make_targets  # noqa: E402

from attacks.base import AttackTarget  # noqa: E402
from attacks.optimization import (  # noqa: E402
    REPLAY_SEED_OFFSET, MatchingConfig, bottlenecks, make_problem, match_gradients,
)
from precode_cli import __version__, data  # noqa: E402
from precode_cli.cli_support import tune_allocator  # noqa: E402

SETTINGS = {"mlp": ("mlp", "none"), "mlp+precode": ("mlp", "precode"), "lenet": ("lenet", "none")}
SEED = 0


# ---------------------------------------------------------------------------------------------- inversefed


def load_inversefed(folder: Path) -> tuple[types.ModuleType, str]:
    """inversefed's `reconstruction_algorithms` module from `folder` (which holds the `inversefed` package).

    Returns the module and how it was imported ("package" or "package shell, __init__ not run").
    """
    sys.path.insert(0, str(folder))
    try:
        importlib.import_module("inversefed")
        how = "import inversefed"
    except ImportError as error:  # e.g. its data module needs `six`
        for name in [n for n in sys.modules if n == "inversefed" or n.startswith("inversefed.")]:
            del sys.modules[name]
        shell = types.ModuleType("inversefed")
        shell.__path__ = [str(folder / "inversefed")]
        sys.modules["inversefed"] = shell
        how = f"package shell, __init__ not run (import inversefed failed: {error})"
    return importlib.import_module("inversefed.reconstruction_algorithms"), how


def inversefed_commit(folder: Path, git_dir: Path | None) -> str:
    """The commit of the inversefed source: from --inversefed-git-dir, a checkout, or a COMMIT file."""
    commands = [["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"]] if git_dir else []
    commands.append(["git", "-C", str(folder), "rev-parse", "HEAD"])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout.strip()
    marker = folder / "COMMIT"
    return marker.read_text().strip() if marker.is_file() else "unknown"


def inversefed_config(iterations: int, defaults: dict[str, Any]) -> dict[str, Any]:
    """The PRECODE preset in inversefed's config keys (checked against its DEFAULT_CONFIG)."""
    config = dict(signed=True, boxed=True, cost_fn="sim", indices="def", weights="equal", lr=0.01, optim="adam",
                  restarts=1, max_iterations=iterations, total_variation=1e-6, init="randn", filter="none",
                  lr_decay=True, scoring_choice="loss")
    if set(config) != set(defaults):
        raise SystemExit(f"inversefed's config keys are {sorted(defaults)}, not the {sorted(config)} this "
                         "benchmark was written for.")
    return config


def mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in data's per-channel normalisation, shaped [C, 1, 1] as inversefed's notebooks pass it."""
    spec = data.data_spec("builtin")
    return (torch.tensor(spec["mean"]).view(-1, 1, 1), torch.tensor(spec["std"]).view(-1, 1, 1))


def reconstructor(rec: types.ModuleType, target: AttackTarget, iterations: int) -> Any:
    """inversefed's GradientReconstructor for one victim, matching the victim's own client loss."""
    defaults = rec.DEFAULT_CONFIG
    model = target.model
    attacker = rec.GradientReconstructor(model, mean_std(), inversefed_config(iterations, defaults), num_images=1)
    attacker.loss_fn = lambda logits, labels: target.loss_fn(model, logits, labels)
    return attacker


def run_inversefed(rec: types.ModuleType, targets: list[AttackTarget], iterations: int) -> list[torch.Tensor]:
    """Attack the targets one after another, as inversefed does; its printing is swallowed."""
    results = []
    for target in targets:
        attacker = reconstructor(rec, target, iterations)
        torch.manual_seed(SEED)  # its start comes from the global generator
        with contextlib.redirect_stdout(io.StringIO()):
            x, _ = attacker.reconstruct(list(target.shared_grads), target.labels,
                                        img_shape=tuple(target.input_shape), eval=False)
        results.append(x)
    return results


def inversefed_milestones(iterations: int) -> list[float]:
    """inversefed's lr-decay steps (its formula), to compare with precode's int(N * f)."""
    return [iterations // 2.667, iterations // 1.6, iterations // 1.142]


# ---------------------------------------------------------------------------------------------- timing


def run_precode(targets: list[AttackTarget], iterations: int) -> torch.Tensor:
    config = MatchingConfig(iterations=iterations, progress_every=10**9)
    return match_gradients(targets, [t.labels for t in targets], config, seed=SEED).inputs


def timed(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(rec: types.ModuleType, targets: list[AttackTarget], iterations: int, repeats: int,
            inversefed_victims: int) -> dict[str, Any]:
    """Alternating rounds of [inversefed on a subset one by one, precode on all at once]; medians."""
    subset = targets[:inversefed_victims]
    run_inversefed(rec, subset[:1], 2)  # warm-up, each side once
    run_precode(targets, 2)
    inversefed_times, precode_times = [], []
    for _ in range(repeats):
        inversefed_times.append(timed(lambda: run_inversefed(rec, subset, iterations)))
        precode_times.append(timed(lambda: run_precode(targets, iterations)))
    inversefed_rate = len(subset) * iterations / statistics.median(inversefed_times)
    precode_rate = len(targets) * iterations / statistics.median(precode_times)
    return {
        "inversefed_victims_timed": len(subset),
        "inversefed_seconds": inversefed_times, "precode_seconds": precode_times,
        "inversefed_victim_its_per_s": inversefed_rate, "precode_victim_its_per_s": precode_rate,
        "ratio": precode_rate / inversefed_rate,
    }


def engine(targets: list[AttackTarget], iterations: int) -> str:
    """Which of precode's engines these targets get (layerwise, autograd or vmap)."""
    problem = make_problem(targets, [t.labels for t in targets], MatchingConfig(iterations=iterations), SEED)
    return problem.engine


# ---------------------------------------------------------------------------------------------- same computation


@contextlib.contextmanager
def recorded_costs(rec: types.ModuleType):
    """Wrap inversefed's module-level `reconstruction_costs` (looked up at call time) to record its values."""
    original, values = rec.reconstruction_costs, []

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        cost = original(*args, **kwargs)
        values.append(float(cost.detach()))
        return cost

    rec.reconstruction_costs = recording
    try:
        yield values
    finally:
        rec.reconstruction_costs = original


@contextlib.contextmanager
def precode_replay_noise(model: torch.nn.Module):
    """Give PRECODE's bottlenecks precode's replay draws (seed + REPLAY_SEED_OFFSET, restart 0), one per forward."""
    handles = []
    for vb in bottlenecks(model).values():
        generator = torch.Generator().manual_seed(SEED + REPLAY_SEED_OFFSET)

        def draw(module: torch.nn.Module, args: tuple, generator: torch.Generator = generator) -> None:
            module.noise = torch.randn(args[0].shape[0], module.k, generator=generator)

        handles.append((vb, vb.register_forward_pre_hook(draw)))
    try:
        yield
    finally:
        for vb, handle in handles:
            handle.remove()
            vb.noise = None


def check_same(rec: types.ModuleType, target: AttackTarget, iterations: int) -> dict[str, Any]:
    """One victim, `iterations` steps, from the same start: per-iteration losses and final inputs compared."""
    config = MatchingConfig(iterations=iterations, progress_every=10**9)
    outcome = match_gradients([target], [target.labels], config, seed=SEED)
    precode_losses = outcome.traces[0].tolist()
    with recorded_costs(rec) as values, precode_replay_noise(target.model):
        x = run_inversefed(rec, [target], iterations)[0]
    inversefed_losses = values[:iterations]  # the last value is its final scoring
    start = torch.randn(1, *target.input_shape, generator=torch.Generator().manual_seed(SEED))
    torch.manual_seed(SEED)
    same_start = torch.equal(start, torch.randn(1, 1, *target.input_shape)[0])
    return {
        "iterations": iterations, "same_start": same_start,
        "precode_losses": precode_losses, "inversefed_losses": inversefed_losses,
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(precode_losses, inversefed_losses)),
        "max_abs_input_difference": float((outcome.inputs[0] - x).abs().max()),
    }


# ---------------------------------------------------------------------------------------------- report


def machine_info(commit: str, how: str) -> dict[str, Any]:
    precode_commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent).stdout.strip()
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": str(torch.__version__),
        "python": platform.python_version(), "precode": __version__, "precode_commit": precode_commit,
        "precode_tracked_files_modified": bool(dirty), "inversefed_commit": commit, "inversefed_import": how,
        "malloc_tuning": os.environ.get("PRECODE_MALLOC_TUNING", "1") != "0",
    }


def print_tables(console: Console, rows: list[dict[str, Any]], checks: dict[str, Any], iterations: int) -> None:
    table = Table(title=f"Inverting Gradients, victim-iterations/s ({iterations} iterations, CPU, "
                        f"{torch.get_num_threads()} threads; median of alternating rounds)")
    for column in ("model", "victims", "inversefed", "precode", "precode / inversefed", "precode engine",
                   "inversefed timed on"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["setting"], str(r["victims"]), f"{r['inversefed_victim_its_per_s']:.1f}",
                      f"{r['precode_victim_its_per_s']:.1f}", f"{r['ratio']:.2f}x", r["precode_engine"],
                      f"{r['inversefed_victims_timed']} of {r['victims']}")
    console.print(table)
    if not checks:
        return
    same = Table(title="Same computation? one victim, same start, same settings")
    for column in ("model", "iterations", "same start", "max |loss difference|", "max |input difference|",
                   "first losses (precode)", "first losses (inversefed)"):
        same.add_column(column, justify="right")
    for name, c in checks.items():
        same.add_row(name, str(c["iterations"]), str(c["same_start"]), f"{c['max_abs_loss_difference']:.2e}",
                     f"{c['max_abs_input_difference']:.2e}", " ".join(f"{v:.6f}" for v in c["precode_losses"][:3]),
                     " ".join(f"{v:.6f}" for v in c["inversefed_losses"][:3]))
    console.print(same)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inversefed", type=Path, required=True,
                        help="the folder holding the `inversefed` package (a checkout of invertinggradients)")
    parser.add_argument("--inversefed-git-dir", type=Path, default=None,
                        help="its git directory, to record the commit (when the folder is an export)")
    parser.add_argument("--models", default=",".join(SETTINGS), help=f"from {', '.join(SETTINGS)}")
    parser.add_argument("--victims", default="1,8,32")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inversefed-victims", type=int, default=4,
                        help="time inversefed on at most this many victims (they are independent and sequential)")
    parser.add_argument("--check-iterations", type=int, default=5, help="0 skips the same-computation check")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/inversefed_side_by_side.json"))
    args = parser.parse_args()
    if not (args.inversefed / "inversefed" / "reconstruction_algorithms.py").is_file():
        print(f"No inversefed package at {args.inversefed} (expected {args.inversefed}/inversefed/"
              "reconstruction_algorithms.py); get it with: git clone "
              "https://github.com/JonasGeiping/invertinggradients /tmp/invertinggradients", file=sys.stderr)
        raise SystemExit(2)
    unknown = [m for m in args.models.split(",") if m not in SETTINGS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    return args


def main() -> None:
    args = parse_args()
    tune_allocator()  # glibc's malloc thresholds: one process, so both sides get them
    rec, how = load_inversefed(args.inversefed.resolve())
    inversefed_config(args.iterations, rec.DEFAULT_CONFIG)  # fail early on a different config schema
    console = Console(width=160)
    device = torch.device("cpu")
    counts = [int(v) for v in args.victims.split(",")]
    rows, checks = [], {}
    for name in args.models.split(","):
        model_name, defense = SETTINGS[name]
        if args.check_iterations:
            checks[name] = check_same(rec, make_targets(model_name, defense, 1, device)[0], args.check_iterations)
        for count in counts:
            targets = make_targets(model_name, defense, count, device)
            row = {"setting": name, "model": model_name, "defense": defense, "victims": count,
                   "iterations": args.iterations, "precode_engine": engine(targets, args.iterations)}
            row.update(measure(rec, targets, args.iterations, args.repeats, min(count, args.inversefed_victims)))
            rows.append(row)
            console.print(f"{name} x{count}: inversefed {row['inversefed_victim_its_per_s']:.1f}, precode "
                          f"{row['precode_victim_its_per_s']:.1f} victim-it/s, {row['ratio']:.2f}x")
            del targets
    print_tables(console, rows, checks, args.iterations)
    console.print("inversefed attacks one shared gradient at a time, so its rate does not depend on the number of "
                  f"victims; it was timed on min(V, {args.inversefed_victims}) victims per setting and its "
                  "victim-iterations/s applies to all V. tune_allocator() applies to both sides (one process).")
    commit = inversefed_commit(args.inversefed.resolve(), args.inversefed_git_dir)
    precode_milestones = sorted({int(args.iterations * f) for f in MatchingConfig().lr_decay_at})
    report = {
        "benchmark": "inversefed_side_by_side", "machine": machine_info(commit, how),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "inversefed_config": inversefed_config(args.iterations, rec.DEFAULT_CONFIG),
                     "mean_std": [data.data_spec("builtin")["mean"], data.data_spec("builtin")["std"]],
                     "precode_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                                        vars(MatchingConfig(iterations=args.iterations)).items()},
                     "lr_decay_steps": {"precode": precode_milestones,
                                        "inversefed": inversefed_milestones(args.iterations)},
                     "model_mode": "train on both sides (inversefed reconstruct(eval=False))", "seed": SEED},
        "same_computation_check": checks, "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"Wrote {args.json}.")


if __name__ == "__main__":
    main()

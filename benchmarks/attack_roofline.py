"""How close each gradient-matching engine comes to what the machine can do: a roofline of one attack iteration.

For each model (`mlp`, `mlp+precode`, `lenet`, `cnn`, `convnet`; untrained, built-in victims, batch
size 1, as `attack_throughput.py` builds them) and each count V of victims, builds the attack's
problem (`attacks.optimization.make_problem`) and times `problem.step()`: the per-iteration work
of the attack (the client's forward pass, the double backward, the cosine terms), without the
optimiser's elementwise update. Every engine that applies is measured: the one the problem picks
itself (`layerwise`, `vmap` or `autograd`), `vmap` forced where `layerwise` would be chosen, and
`autograd` forced at one victim. For each it reports

- the floating-point work of one iteration, counted by `torch.utils.flop_counter.FlopCounterMode`
  around one step. It counts matrix multiplications and convolutions (mm, addmm, bmm,
  convolution and their backward), i.e. the useful work; elementwise ops, reductions and copies are
  not counted, and each engine is credited with the FLOPs it actually issues (vmap forms every
  victim's full weight gradient, layerwise does not). torch's formula for a grouped convolution's
  weight gradient is replaced by a correct one (`grouped_conv_backward_flop`): vmap runs per-victim
  convolutions as convolutions grouped by victim, which torch's own count inflates V-fold;
- the achieved FLOP/s: counted FLOPs / median seconds per step (engines alternate over several
  rounds of at least `--round-seconds` each, after a warm-up);
- a lower bound on each step's memory traffic: the bytes of the shared gradients (one per victim,
  read every iteration; the paper's MLP has a 3072x1024 one; their low-rank factors instead where the
  layerwise engine matches through them) and of the model's parameters, counted as if nothing stayed
  in cache between steps; arithmetic intensity = FLOPs / those bytes;
- the roofline bound min(peak matmul FLOP/s, intensity x memory bandwidth) and the achieved
  fraction of it ("% of bound"). The bandwidth is main memory's: a step whose bytes stay in cache
  can pass 100% of a memory bound.

The machine's own limits are measured in the same run, with the same thread count: float32 matmul
FLOP/s (the best median over square matmuls of a few sizes) and memory bandwidth (a large float32
`copy_`, counting the bytes read and written), each before and after the sweep; the higher of the
two is the limit used. Why: to know whether an engine is slow because it does too much work, moves
too much memory, or simply runs far below the machine (overhead), before optimising anything. With
`--profile MODEL:V[:ENGINE]` it instead runs `torch.profiler` on a few steps of one setting and
prints the top ops by self CPU time, which is where the time goes.

On a machine shared with other jobs, more threads than idle cores measure the scheduler rather
than the engines (every parallel op waits for a descheduled thread); compare with `--threads 1`.

    python benchmarks/attack_roofline.py --models mlp,mlp+precode,lenet,cnn,convnet --victims 1,8,32
    python benchmarks/attack_roofline.py --profile mlp:8
    python benchmarks/attack_roofline.py --profile lenet:8:vmap --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attack_throughput import make_targets  # noqa: E402  (the benchmarks folder is not a package)

from attacks.base import AttackTarget  # noqa: E402
from attacks.optimization import (  # noqa: E402
    MatchingConfig, _Problem, make_problem,
)
from precode_cli import __version__  # noqa: E402
from precode_cli.cli_support import tune_allocator  # noqa: E402

ENGINES = ("layerwise", "vmap", "looped", "autograd")
DEFAULT_MODELS = "mlp,mlp+precode,lenet,cnn,convnet"
BYTES_PER_FLOAT = 4
DISTANCE_TOLERANCE = 1e-4  # engines must agree on the first step's cosine distances


@dataclass(frozen=True)
class Setting:
    """A model and its defense, labelled as on the command line (`mlp+precode`)."""

    label: str
    model: str
    defense: str


@dataclass
class MachineLimits:
    """Measured float32 matmul FLOP/s and copy bandwidth (bytes/s)."""

    matmul_flops: float
    bandwidth: float
    matmul_by_size: dict[int, float]


@dataclass
class EngineRun:
    """One engine's problem and what its first (counted) step gave."""

    engine: str
    problem: _Problem
    flops: int
    flops_by_op: dict[str, int]
    distance: torch.Tensor


@dataclass
class Measurement:
    """What one (setting, victims, engine) gave: counted work, its traffic lower bound, and time per step."""

    setting: Setting
    victims: int
    engine: str
    flops: int
    flops_by_op: dict[str, int]
    traffic: dict[str, int]
    seconds: float


# ---------------------------------------------------------------- command line


def parse_settings(spec: str) -> list[Setting]:
    """`mlp,mlp+precode` -> settings; `MODEL+DEFENSE` attaches a defense, a bare name means none."""
    settings = []
    for label in (s.strip() for s in spec.split(",") if s.strip()):
        model, _, defense = label.partition("+")
        settings.append(Setting(label, model, defense or "none"))
    return settings


def parse_profile(spec: str) -> tuple[Setting, int, str | None]:
    """`MODEL[+DEFENSE]:V[:ENGINE]` -> (setting, victims, engine or None for the problem's own choice)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise SystemExit(f"--profile takes MODEL:V or MODEL:V:ENGINE, e.g. mlp:8 or lenet:8:vmap; not {spec!r}")
    engine = parts[2] if len(parts) == 3 else None
    if engine is not None and engine not in ENGINES:
        raise SystemExit(f"--profile engine must be one of {', '.join(ENGINES)}; not {engine!r}")
    return parse_settings(parts[0])[0], int(parts[1]), engine


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- machine limits


def median_seconds(work: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `work()` over `repeats` calls, after one untimed call."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_flops(size: int, repeats: int) -> float:
    """float32 FLOP/s of a size x size @ size x size matmul (2 size^3 FLOPs), median of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    return 2 * size**3 / median_seconds(lambda: torch.mm(a, b, out=out), repeats)


def copy_bandwidth(mib: int, repeats: int) -> float:
    """Bytes/s of `b.copy_(a)` on float32 tensors of `mib` MiB each, counting one read and one write."""
    numel = mib * 2**20 // BYTES_PER_FLOAT
    source, target = torch.rand(numel), torch.empty(numel)
    seconds = median_seconds(lambda: target.copy_(source), repeats)
    return 2 * numel * BYTES_PER_FLOAT / seconds


def measure_limits(sizes: list[int], bandwidth_mib: int, repeats: int) -> MachineLimits:
    by_size = {size: matmul_flops(size, repeats) for size in sizes}
    return MachineLimits(max(by_size.values()), copy_bandwidth(bandwidth_mib, repeats), by_size)


def best_of(first: MachineLimits, second: MachineLimits) -> MachineLimits:
    """The machine's limits: the higher of two measurements (other load only ever lowers them)."""
    sizes = {s: max(first.matmul_by_size[s], second.matmul_by_size[s]) for s in first.matmul_by_size}
    return MachineLimits(max(first.matmul_flops, second.matmul_flops), max(first.bandwidth, second.bandwidth), sizes)


# ---------------------------------------------------------------- problems and engines


def build_problem(targets: list[AttackTarget], engine: str | None, config: MatchingConfig) -> _Problem:
    """The attack's problem for `targets`, with its step forced to `engine` (None: the problem's own choice)."""
    problem = make_problem(targets, [t.labels for t in targets], config, seed=0)
    if engine is None or engine == problem.engine:
        return problem
    if engine == "vmap":
        problem._step = problem.vmapped_step(problem.generic_objective)
    elif engine == "looped" and hasattr(problem, "_looped_step") and problem.rows > 1:
        problem._step = problem._looped_step()
    elif engine == "autograd" and problem.rows == 1:
        problem._step = problem._single_step()
    else:
        raise ValueError(f"engine {engine!r} does not apply to this problem (it chose {problem.engine!r})")
    problem.engine = engine
    return problem


def applicable_engines(natural: str, victims: int) -> list[str]:
    """The problem's own engine first, then vmap (always possible), the row loop at several victims (where
    the tree has it), then autograd at one victim."""
    takes_loop = hasattr(_Problem, "_looped_step")
    engines = [natural]
    for engine in ("vmap", "looped", "autograd"):
        applies = {"vmap": True, "looped": takes_loop and victims > 1, "autograd": victims == 1}[engine]
        if engine not in engines and applies:
            engines.append(engine)
    return engines


Shape = Sequence[int]


def grouped_conv_backward_flop(grad_out_shape: Shape, x_shape: Shape, w_shape: Shape, _bias: Any, _stride: Any,
                               _padding: Any, _dilation: Any, transposed: bool, _output_padding: Any, groups: int,
                               output_mask: Sequence[bool], out_shape: Sequence[Shape | None], **kwargs: Any) -> int:
    """FLOPs of `aten.convolution_backward`, with the weight gradient of a grouped convolution divided by groups.

    torch's own formula (torch 2.14) ignores `groups` for the weight gradient and so counts a grouped
    convolution's weight gradient `groups` times over. vmap computes per-victim weight gradients, and
    the double backward's convolutions with per-victim weights, as convolutions grouped by victim, so
    without this the count of a vectorised conv model grows as victims^2 (and exceeds the machine's peak).
    """
    def swap(shape: Shape) -> list[int]:
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:  # grad_input: a transposed conv of grad_out with the weight ([out, in/groups, ...])
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad_weight: a conv of the input with grad_out, over `groups` independent groups
        pair = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flops += conv_flop_count(swap(pair[0]), swap(pair[1]), swap(out_shape[1]), transposed=False) // groups
    return flops


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}


def counted_step(problem: _Problem) -> tuple[int, dict[str, int], torch.Tensor]:
    """One step under `FlopCounterMode`: total FLOPs, FLOPs per aten op, and the rows' distances."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        _, distance = problem.step()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op, distance.detach().cpu()


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def compulsory_bytes(problem: _Problem) -> dict[str, int]:
    """Bytes a step must read at least once: every row's shared gradient and the model's parameters.

    Parameters are counted once when all victims share them (`matched_dim is None`), per row otherwise.
    Where the layerwise engine matches a shared gradient through exact low-rank factors (its `factors`,
    when the attack has them), it reads the factors instead of the gradient, and they are counted.
    """
    factors = getattr(getattr(problem, "layerwise", None), "factors", {}) if problem.engine == "layerwise" else {}
    shared = sum(nbytes(g) for name, g in problem.shared.items() if name not in factors)
    shared += sum(nbytes(left) + nbytes(right) for left, right in factors.values())
    params = sum(nbytes(p) for p in problem.matched_params.values())
    params += sum(nbytes(t) for t in problem.fixed.values() if t.is_floating_point())
    return {"shared_grad_bytes": shared, "param_bytes": params, "total": shared + params}


def run_engines(targets: list[AttackTarget], config: MatchingConfig, console: Console) -> list[EngineRun]:
    """Every applicable engine's problem, each with one counted step; warns when their distances disagree."""
    natural = build_problem(targets, None, config)
    runs = []
    for engine in applicable_engines(natural.engine, len(targets)):
        problem = natural if engine == natural.engine else build_problem(targets, engine, config)
        flops, by_op, distance = counted_step(problem)
        runs.append(EngineRun(engine, problem, flops, by_op, distance))
    reference = runs[0].distance
    for run in runs[1:]:
        gap = float((run.distance - reference).abs().max())
        if gap > DISTANCE_TOLERANCE:
            console.print(f"[yellow]warning: {run.engine} disagrees with {runs[0].engine} on the first step's "
                          f"distances by {gap:.2e}[/yellow]")
    return runs


def seconds_per_step(problem: _Problem, round_seconds: float) -> float:
    """Mean seconds of the steps of one round: at least one step, more until `round_seconds` have passed."""
    steps, started = 0, time.perf_counter()
    while True:
        problem.step()
        steps += 1
        elapsed = time.perf_counter() - started
        if elapsed >= round_seconds:
            return elapsed / steps


def time_engines(runs: list[EngineRun], rounds: int, round_seconds: float, warmup: int) -> dict[str, float]:
    """Median seconds per step of each engine, the engines alternating round by round after a warm-up."""
    for run in runs:
        for _ in range(warmup):
            run.problem.step()
    per_step: dict[str, list[float]] = {run.engine: [] for run in runs}
    for _ in range(rounds):
        for run in runs:
            per_step[run.engine].append(seconds_per_step(run.problem, round_seconds))
    return {engine: statistics.median(times) for engine, times in per_step.items()}


def roofline_row(m: Measurement, limits: MachineLimits) -> dict:
    intensity = m.flops / m.traffic["total"]
    bound = min(limits.matmul_flops, intensity * limits.bandwidth)
    achieved = m.flops / m.seconds
    return {
        "model": m.setting.model, "defense": m.setting.defense, "label": m.setting.label, "victims": m.victims,
        "engine": m.engine, "flops_per_iter": m.flops, "flops_by_op": m.flops_by_op,
        "seconds_per_iter": m.seconds, "victim_iters_per_s": m.victims / m.seconds,
        "achieved_flops_per_s": achieved, "bytes_lower_bound": m.traffic, "intensity_flops_per_byte": intensity,
        "bound_flops_per_s": bound, "bound_kind": "compute" if bound == limits.matmul_flops else "memory",
        "fraction_of_bound": achieved / bound,
    }


# ---------------------------------------------------------------- output


def render_table(rows: list[dict], limits: MachineLimits, threads: int) -> Table:
    table = Table(title=f"attack step roofline (cpu, {threads} threads; peak {limits.matmul_flops / 1e9:.0f} GFLOP/s, "
                        f"{limits.bandwidth / 1e9:.1f} GB/s)")
    columns = ("model", "defense", "victims", "engine", "GFLOP/iter", "ms/iter", "victim-iter/s", "GFLOP/s",
               "intensity", "bound GFLOP/s", "% of bound")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "defense", "engine") else "right")
    for r in rows:
        table.add_row(
            r["model"], r["defense"], str(r["victims"]), r["engine"], f"{r['flops_per_iter'] / 1e9:.3f}",
            f"{r['seconds_per_iter'] * 1e3:.2f}", f"{r['victim_iters_per_s']:.1f}",
            f"{r['achieved_flops_per_s'] / 1e9:.2f}", f"{r['intensity_flops_per_byte']:.1f}",
            f"{r['bound_flops_per_s'] / 1e9:.1f}{'' if r['bound_kind'] == 'compute' else ' (mem)'}",
            f"{100 * r['fraction_of_bound']:.1f}%",
        )
    return table


def describe(limits: MachineLimits) -> str:
    return f"{limits.matmul_flops / 1e9:.1f} GFLOP/s matmul, {limits.bandwidth / 1e9:.1f} GB/s copy"


def limits_json(limits: MachineLimits) -> dict:
    return {"matmul_gflops": limits.matmul_flops / 1e9, "bandwidth_gb_s": limits.bandwidth / 1e9,
            "matmul_gflops_by_size": {str(s): f / 1e9 for s, f in limits.matmul_by_size.items()}}


def machine_info(threads: int, before: MachineLimits, after: MachineLimits, used: MachineLimits,
                 args: argparse.Namespace) -> dict:
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "available_cores": available_cores(), "threads": threads,
        "torch": str(torch.__version__), "precode": __version__,
        "peak_matmul_gflops": used.matmul_flops / 1e9, "bandwidth_gb_s": used.bandwidth / 1e9,
        "matmul_sizes": args.matmul_sizes, "bandwidth_mib": args.bandwidth_mib,
        "measured_before": limits_json(before), "measured_after": limits_json(after),
    }


# ---------------------------------------------------------------- profile


def profile_setting(setting: Setting, victims: int, engine: str | None, steps: int, config: MatchingConfig,
                    console: Console, by_shape: bool = False, row_limit: int = 15) -> None:
    """Run `torch.profiler` on `steps` steps of one setting and print the top ops by self CPU time
    (split by the ops' input shapes when `by_shape`)."""
    targets = make_targets(setting.model, setting.defense, victims, torch.device("cpu"))
    problem = build_problem(targets, engine, config)
    for _ in range(2):  # warm-up
        problem.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            problem.step()
        elapsed = time.perf_counter() - started
    console.print(f"{setting.label} x{victims}, engine {problem.engine}: {steps} steps, "
                  f"{elapsed / steps * 1e3:.1f} ms/step under the profiler")
    averages = prof.key_averages(group_by_input_shape=by_shape)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=row_limit, max_name_column_width=40,
                         max_shapes_column_width=80))


# ---------------------------------------------------------------- main


def measure_setting(setting: Setting, victims: int, config: MatchingConfig, args: argparse.Namespace,
                    console: Console) -> list[Measurement]:
    """Count and time every applicable engine on `victims` victims of one model."""
    targets = make_targets(setting.model, setting.defense, victims, torch.device("cpu"))
    runs = run_engines(targets, config, console)
    seconds = time_engines(runs, args.rounds, args.round_seconds, args.warmup)
    for run in runs:
        console.print(f"{setting.label} x{victims} {run.engine}: {seconds[run.engine] * 1e3:.1f} ms/iter, "
                      f"{run.flops / 1e9:.3f} GFLOP")
    return [Measurement(setting, victims, run.engine, run.flops, run.flops_by_op, compulsory_bytes(run.problem),
                        seconds[run.engine]) for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated; MODEL+DEFENSE for a defense")
    parser.add_argument("--victims", default="1,8,32")
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median taken)")
    parser.add_argument("--round-seconds", type=float, default=1.0,
                        help="each engine steps for at least this long per round (and at least once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per engine, after the counted one")
    parser.add_argument("--matmul-sizes", default="2048,3072", help="square matmul sizes for the peak")
    parser.add_argument("--bandwidth-mib", type=int, default=256, help="size of each tensor in the copy")
    parser.add_argument("--limit-repeats", type=int, default=5)
    parser.add_argument("--profile", metavar="MODEL:V[:ENGINE]", help="profile one setting instead of the sweep")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-shapes", action="store_true", help="split the profile by the ops' input shapes")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/attack_roofline.json"))
    args = parser.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    console = Console(width=170)
    config = MatchingConfig(iterations=1, progress_every=10**9)
    if args.profile:
        setting, victims, engine = parse_profile(args.profile)
        profile_setting(setting, victims, engine, args.profile_steps, config, console, args.profile_shapes)
        return

    sizes = [int(s) for s in args.matmul_sizes.split(",")]
    before = measure_limits(sizes, args.bandwidth_mib, args.limit_repeats)
    console.print(f"machine before: {describe(before)}")
    measured: list[Measurement] = []
    interrupted = False
    try:
        for setting in parse_settings(args.models):
            for victims in [int(v) for v in args.victims.split(",")]:
                measured.extend(measure_setting(setting, victims, config, args, console))
    except KeyboardInterrupt:  # Ctrl-C: report the settings finished so far
        interrupted = True
        console.print("[yellow]interrupted: reporting the settings finished so far[/yellow]")
    after = measure_limits(sizes, args.bandwidth_mib, args.limit_repeats)
    console.print(f"machine after: {describe(after)}")
    limits = best_of(before, after)
    rows = [roofline_row(m, limits) for m in measured]
    console.print(render_table(rows, limits, threads))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "attack_roofline", "machine": machine_info(threads, before, after, limits, args),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "interrupted": interrupted, "results": rows,
    }, indent=2) + "\n")
    console.print(f"Wrote {args.json}.")


if __name__ == "__main__":
    main()

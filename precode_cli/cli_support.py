"""What every command shares: the error path, --config files, progress bars, output and speed set-up.

Kept free of torch so that `precode --help` stays fast.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import typer
from rich.console import Console

from precode_cli.errors import UserError

console = Console(stderr=True, highlight=False)  # messages and progress
stdout = Console(highlight=False)  # tables: the results a user may pipe or save
if not stdout.is_terminal:
    stdout.width = 160  # logs and pipes: wide enough for the evaluation table
STATE = {"debug": False}


def cli_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body with precode's error path.

    A `UserError` prints one sentence and exits 2; any other exception is a bug in precode and
    exits 1; `precode --debug ...` shows the traceback instead. Ctrl-C exits 130.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except UserError as err:
            if STATE["debug"]:
                raise
            console.print(f"[bold red]Error:[/] {err}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            if STATE["debug"]:
                raise
            console.print("[yellow]Interrupted.[/] Files already written are complete; nothing is half-written.")
            raise typer.Exit(130) from None
        except Exception as err:  # noqa: BLE001 - the one place that turns bugs into a short message
            if STATE["debug"]:
                raise
            console.print(
                f"[bold red]Internal error:[/] {type(err).__name__}: {err}. "
                "This is a bug in precode; run again with `precode --debug ...` for the traceback and report it.",
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """--config FILE.yaml: its keys become the command's defaults, so options on the command line win."""
    if value is None:
        return value
    import yaml

    try:
        loaded = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
    except OSError as err:
        raise typer.BadParameter(f"cannot read {value} ({err.strerror}).", ctx=ctx, param=param) from err
    except yaml.YAMLError as err:
        raise typer.BadParameter(f"{value} is not valid YAML ({err}).", ctx=ctx, param=param) from err
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise typer.BadParameter(f"{value} must hold a mapping of option names to values.", ctx=ctx, param=param)
    params = {p.name: p for p in ctx.command.params if p.name not in ("config", "help")}
    defaults = {}
    for key, setting in loaded.items():
        name = str(key).replace("-", "_")
        if name not in params:
            options = ", ".join(sorted(k.replace("_", "-") for k in params))
            raise typer.BadParameter(f"{value} has unknown key {key!r}; known keys: {options}.", ctx=ctx, param=param)
        if getattr(params[name], "multiple", False) and isinstance(setting, str):
            setting = [setting]  # `defense: precode` means the list [precode], as --defense precode does
        defaults[name] = setting
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_option() -> Any:
    """The --config option every command takes."""
    return typer.Option(
        None,
        "--config",
        help="YAML file whose keys mirror this command's options (e.g. batch-size: 8); command-line options win.",
        is_eager=True,
        callback=load_config,
        exists=False,
        dir_okay=False,
    )


class ProgressBar:
    """A rich progress bar on stderr; silent when stderr is not a terminal (logs, CI, pipes)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )

    def __enter__(self) -> "ProgressBar":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def task(self, description: str, total: int) -> "ProgressTask":
        """Add a line to the display."""
        return ProgressTask(self._progress, self._progress.add_task(description, total=total))


class ProgressTask:
    """One line of a `ProgressBar`."""

    def __init__(self, progress: Any, task_id: Any) -> None:
        self._progress, self._id = progress, task_id

    def advance(self, steps: int = 1) -> None:
        self._progress.advance(self._id, steps)

    def set(self, completed: int) -> None:
        self._progress.update(self._id, completed=completed)

    def restart(self, description: str) -> None:
        """Reuse this line for the next item (the next dump) instead of adding a line per item."""
        self._progress.reset(self._id, description=description)


def say(message: str) -> None:
    """A one-line status message on stderr."""
    console.print(message, soft_wrap=True)


def tune_allocator() -> None:
    """Keep glibc from returning and re-mapping memory on every iteration of a tight torch loop.

    benchmarks/malloc_tuning.py, on a 2-core CPU machine: an IG iteration on the paper's MLP took a
    median 30.9 ms with glibc's defaults and 19.5 ms with these thresholds raised (1.6x).
    Set PRECODE_MALLOC_TUNING=0 to opt out. A no-op off glibc.
    """
    import ctypes
    import os

    if os.environ.get("PRECODE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_mmap_threshold, 1 << 25)


def seed_everything(seed: int) -> None:
    """Seed torch's global generator (model initialisation, PRECODE's sampling) for repeatable runs."""
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def parse_indices(text: str) -> tuple[int, int]:
    """START:STOP as in a Python slice, both given, 0 <= START < STOP."""
    parts = text.split(":")
    if len(parts) != 2 or not all(re.fullmatch(r"\s*[0-9]+\s*", p) for p in parts):
        raise UserError(f"--indices {text!r} is not START:STOP with two non-negative integers (e.g. 0:8).")
    start, stop = int(parts[0]), int(parts[1])
    if start >= stop:
        raise UserError(f"--indices {text!r} selects nothing; STOP must be larger than START.")
    return start, stop


def tool_info() -> dict[str, Any]:
    """Versions recorded in every output file."""
    import platform

    import torch

    from precode_cli import __version__

    return {"precode": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def now_iso() -> str:
    """The current UTC time, ISO 8601, for provenance metadata."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def iter_chunks(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    """Consecutive [a, b) ranges of at most `size` covering [start, stop)."""
    for a in range(start, stop, size):
        yield a, min(a + size, stop)


class GracefulStop:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request that long loops check between steps.

    A loop that sees `requested` saves its state and returns; a second signal interrupts at once.
    Used as a context manager so the previous handlers come back afterwards.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        console.print("[yellow]Stopping after this step[/] to save a checkpoint (press Ctrl-C again to stop at once).")

    def __enter__(self) -> "GracefulStop":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

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
from rich.text import Text

from precode_cli.errors import UserError

console = Console(stderr=True, highlight=False)  # messages and progress
stdout = Console(highlight=False)  # tables: the results a user may pipe or save
if not stdout.is_terminal and not __import__("os").environ.get("COLUMNS", "").strip().isdigit():
    stdout.width = 160  # logs and pipes: wide enough for the evaluation table; COLUMNS=80 asks for narrower
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
            console.print(Text.assemble(("Error:", "bold red"), " ", str(err)), soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            if STATE["debug"]:
                raise
            console.print(Text.assemble(("Interrupted.", "yellow"),
                                        " Files already written are complete; nothing is half-written."))
            raise typer.Exit(130) from None
        except Exception as err:  # noqa: BLE001 - the one place that turns bugs into a short message
            if STATE["debug"]:
                raise
            console.print(Text.assemble(
                ("Internal error:", "bold red"), f" {type(err).__name__}: {err}. ",
                "This is a bug in precode; run again with `precode --debug ...` for the traceback and report it.",
            ), soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


MAX_CONFIG_BYTES = 64 * 1024  # a config holds a few option values
MAX_CONFIG_DEPTH = 4  # the mapping, a list, its items (one more, to name a too-deep list in the message)
MAX_CONFIG_TEXT = 4096  # characters in one value: enough for any path
_YAML_TAG = "tag:yaml.org,2002:"
_CONFIG_TAGS = {_YAML_TAG + kind for kind in ("str", "int", "float", "bool", "null", "timestamp", "seq", "map")}


class _ConfigRefusal(Exception):
    """One sentence about a --config file; `load_config` turns it into a usage error."""


def load_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """--config FILE.yaml: its keys become the command's defaults, so options on the command line win.

    The file is someone's text, so it is read within bounds and checked against the command's options
    before anything else sees it: at most MAX_CONFIG_BYTES, no YAML aliases (an "anchor bomb" of nested
    aliases would expand to billions of values), no nesting deeper than MAX_CONFIG_DEPTH, only YAML's
    plain tags, and each value of its option's shape and type (`_config_value`). Values of text options
    (paths, names, --indices) are the text as written: YAML 1.1 would read `indices: 10:12` as 612.
    """
    if value is None:
        return value
    params = {p.name: p for p in ctx.command.params if p.name not in ("config", "help")}
    try:
        defaults = _read_config(Path(value), params, _option_kinds(ctx.command.callback, params))
    except _ConfigRefusal as err:
        raise typer.BadParameter(str(err), ctx=ctx, param=param) from None
    # A null (`seed: ~`) keeps the option's default, so it is left out of default_map: click 8.5
    # (which typer 0.20 uses) takes a None found there as the value itself, while the click that
    # typer >= 0.21 bundles falls through to the option's default.
    ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in defaults.items() if v is not None}}
    return value


def _read_config(path: Path, params: dict[str, Any], kinds: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    import yaml

    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise _ConfigRefusal(f"cannot read {path} ({err.strerror or err}).") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise _ConfigRefusal(f"{path} is over {MAX_CONFIG_BYTES // 1024} KiB; a config file holds option values, "
                             "so precode reads at most that much.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _ConfigRefusal(f"{path} is not UTF-8 text.") from None
    loader = _config_loader()(text)
    loader.config_path = path  # for its messages
    try:
        root = loader.get_single_node()
        if root is None:
            return {}  # an empty file
        if not isinstance(root, yaml.MappingNode) or root.tag != _YAML_TAG + "map":
            raise _ConfigRefusal(f"{path} must hold a mapping of option names to values.")
        defaults: dict[str, Any] = {}
        keys = _config_keys(params)
        for key_node, value_node in root.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            name = keys.get(key.replace("-", "_")) if isinstance(key, str) else None
            if name not in params:
                options = ", ".join(sorted({_config_key(k, p) for k, p in params.items()}))
                shown = _clip(key) if key is not None else f"on line {key_node.start_mark.line + 1}"
                raise _ConfigRefusal(f"{path} has unknown key {shown}; known keys: {options}.")
            if name in defaults:
                raise _ConfigRefusal(f"{path} sets {_clip(key)} twice; keep one.")
            defaults[name] = _config_value(loader, path, key, value_node, *kinds[name])
        return defaults
    except yaml.YAMLError as err:
        raise _ConfigRefusal(f"{path} is not valid YAML ({_yaml_problem(err)}).") from None
    finally:
        loader.dispose()


def _config_key(name: str, param: Any) -> str:
    """The key a config file uses for a parameter: its long option's name (`checkpoint-epochs`), else its name."""
    long = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
    return long[0][2:] if long else name.replace("_", "-")


def _config_keys(params: dict[str, Any]) -> dict[str, str]:
    """Accepted keys (dashes as underscores) -> parameter name: the name, and every long option's name."""
    keys = {name: name for name in params}
    for name, param in params.items():
        for opt in getattr(param, "opts", ()):
            if opt.startswith("--"):
                keys.setdefault(opt[2:].replace("-", "_"), name)
    return keys


@functools.lru_cache(maxsize=1)
def _config_loader() -> Any:
    """yaml.SafeLoader that refuses aliases and deep nesting while it parses, before anything is built."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        depth = 0
        config_path: Any = "the config file"

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise _ConfigRefusal(f"{self.config_path} uses the YAML alias *{_clip(event.anchor, quote=False)} on line "
                                     f"{event.start_mark.line + 1}; config files may not use aliases, so write the "
                                     "value out.")
            self.depth += 1
            try:
                if self.depth > MAX_CONFIG_DEPTH:
                    line = self.peek_event().start_mark.line + 1
                    raise _ConfigRefusal(f"{self.config_path} nests values more than {MAX_CONFIG_DEPTH} levels deep on "
                                         f"line {line}; a config holds single values and lists of them.")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return ConfigLoader


def _option_kinds(callback: Any, params: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Each option's value kind ("int", "float", "bool" or "text") and whether it takes a list.

    Read from the command function's annotations (`Optional[int]`, `list[str]`, `bool`, `Path`...);
    anything else (paths, names, choices) is text.
    """
    import types
    import typing

    try:
        hints = typing.get_type_hints(callback) if callback is not None else {}
    except Exception:  # noqa: BLE001 - unreadable annotations: every value is text, checked by typer
        hints = {}

    def strip_optional(annotation: Any) -> Any:
        if typing.get_origin(annotation) in (typing.Union, getattr(types, "UnionType", typing.Union)):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            return args[0] if len(args) == 1 else str
        return annotation

    kinds = {}
    for name, param in params.items():
        annotation = strip_optional(hints.get(name, str))
        many = bool(getattr(param, "multiple", False)) or getattr(param, "nargs", 1) == -1
        if typing.get_origin(annotation) in (list, tuple, set, frozenset):
            many, annotation = True, strip_optional((typing.get_args(annotation) or (str,))[0])
        if getattr(param, "is_flag", False) or annotation is bool:
            kind = "bool"
        else:
            kind = {int: "int", float: "float"}.get(annotation, "text")
        kinds[name] = (kind, many)
    return kinds


def _config_value(loader: Any, path: Path, key: str, node: Any, kind: str, many: bool) -> Any:
    """The value of one key: one scalar, or for a repeatable option a list of scalars (or one)."""
    import yaml

    _check_tag(path, node)
    if isinstance(node, yaml.MappingNode):
        raise _ConfigRefusal(f"{path}: {_clip(key)} takes {'a list of values' if many else 'one value'}, "
                             "not a mapping.")
    if isinstance(node, yaml.SequenceNode):
        if not many:
            raise _ConfigRefusal(f"{path}: {_clip(key)} takes one value, not a list.")
        items = []
        for item in node.value:
            _check_tag(path, item)
            if not isinstance(item, yaml.ScalarNode):
                raise _ConfigRefusal(f"{path}: the items of {_clip(key)} must be single values, not lists or mappings.")
            value = _config_scalar(loader, path, key, item, kind)
            if value is None:
                raise _ConfigRefusal(f"{path}: the list {_clip(key)} holds an empty item (null).")
            items.append(value)
        return items
    value = _config_scalar(loader, path, key, node, kind)
    return [value] if many and value is not None else value  # `defense: precode` is the list [precode]


def _config_scalar(loader: Any, path: Path, key: str, node: Any, kind: str) -> Any:
    import yaml

    if len(node.value) > MAX_CONFIG_TEXT:
        raise _ConfigRefusal(f"{path}: the value of {_clip(key)} has {len(node.value):,} characters; "
                             f"at most {MAX_CONFIG_TEXT:,} are accepted.")
    if node.tag == _YAML_TAG + "null":
        return None  # `key:`, `key: ~` or `key: null`: the option keeps its default
    if kind == "text":
        return node.value  # the text as written, whatever YAML 1.1 would make of it (10:12 -> 612)
    try:
        value = loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError):
        value = node.value  # e.g. a timestamp that is no date: left to the option's own check below
    if isinstance(value, str):
        return value  # converted and checked by the option exactly as on the command line (`1e-6`, `"8"`)
    wanted = {"int": "a whole number", "float": "a number", "bool": "true or false"}[kind]
    fits = {"int": (int,), "float": (int, float), "bool": (bool,)}[kind]
    if isinstance(value, fits) and (kind == "bool" or not isinstance(value, bool)):
        return value
    raise _ConfigRefusal(f"{path}: {_clip(key)} takes {wanted}, not {_clip(node.value)}.")


def _check_tag(path: Path, node: Any) -> None:
    """Only YAML's own plain tags: `!!python/object/apply:os.system` and the like are refused, never built."""
    if node.tag not in _CONFIG_TAGS:
        tag = node.tag.replace(_YAML_TAG, "!!", 1) if node.tag.startswith(_YAML_TAG) else node.tag
        raise _ConfigRefusal(f"{path} is not valid YAML for precode: the tag {_clip(tag, quote=False)} on line "
                             f"{node.start_mark.line + 1} is not accepted in config files.")


def _yaml_problem(err: Exception) -> str:
    """A YAML parser error on one line: where, and what."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return _clip(where + str(problem), limit=160, quote=False)


def _clip(text: Any, limit: int = 60, quote: bool = True) -> str:
    """Text from a file, on one line and shortened; quoted as `'text'` unless `quote` is False."""
    text = " ".join(str(text).split()) if not quote else str(text)
    shown = repr(text) if quote else text
    return shown if len(shown) <= limit else shown[: limit - 4] + ("...'" if quote else "...")


def config_option() -> Any:
    """The --config option every command takes."""
    return typer.Option(
        None,
        "--config",
        metavar="FILE",
        help="YAML file of option values (e.g. seed: 1); the command line wins.",
        rich_help_panel="Output and run",
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
            TextColumn("{task.description}", markup=False),  # names of files: plain text, never markup
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
    """A one-line status message on stderr, printed as plain text.

    Messages hold paths and names that files and users control; rich would read `[red]` or `[/]` in them
    as markup (and `:smile:` as an emoji), so they are printed as `Text`, never parsed.
    """
    console.print(Text(message), soft_wrap=True)


def plain_row(table: Any, *cells: object) -> None:
    """Add a row to a rich `Table` whose cells print as plain text, not as markup."""
    table.add_row(*(Text(str(cell)) for cell in cells))


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

"""The `precode` command-line app: four stages connected by files.

    precode train               -> RUN_DIR/model.safetensors, run.yaml, history.json
    precode capture-gradients   -> GRADS_DIR/<id>.safetensors (+ <id>.truth.safetensors)
    precode attack              -> RECON_DIR/<id>.safetensors
    precode evaluate            -> REPORT_DIR/metrics.json, metrics.csv, grid.png, report.md
"""

from __future__ import annotations

import re
import sys
from typing import Any, Sequence

import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from precode_cli import __version__
from precode_cli.cli_support import STATE
from precode_cli.commands import options as opt
from precode_cli.commands.attack import attack
from precode_cli.commands.capture import capture_gradients
from precode_cli.commands.evaluate import evaluate
from precode_cli.commands.train import train

# click's usage-error class, reached through typer's public API (typer vendors its own click).
UsageError = typer.BadParameter.__mro__[1]

# Old option names that still work: command -> {old: new}. Each prints a one-line note on stderr.
DEPRECATED = {
    "train": {"--checkpoint-every": "--checkpoint-epochs"},
    "attack": {"--model": "--trust-builder", "--checkpoint-every": "--checkpoint-iterations"},
}


MAX_CHOICES_SHOWN = 20  # longer lists of choices (`<builtin|cifar10|...>`) go into the help text

# The help layout below is the same under typer 0.20 (whose parameters are click's, with click.Choice
# and click.IntRange types; flwr 1.42 caps typer below 0.21) and under newer typer such as 0.29 (its own
# parameter classes, with `type_descriptor`, `display_type_rich` and `_get_number_range_help_str`).
# Where typer has a method for a piece of the help, it is used; otherwise it is computed here alike.


def _is_option(param: Any) -> bool:
    """A typer option, or click's own --help option (typer 0.20 makes that one a plain click.Option)."""
    return isinstance(param, TyperOption) or getattr(param, "param_type_name", None) == "option"


def _choices(param: Any) -> list[str] | None:
    """The values of a `Literal[...]` option, or None for an option without a fixed set."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:  # newer typer
        return [str(c) for c in descriptor.choices or ()] if descriptor.is_choice else None
    choices = getattr(param.type, "choices", None)  # typer 0.20: a click.Choice
    return None if choices is None else [str(c) for c in choices]


def _type_label(param: Any, ctx: Any) -> str:
    """INT, FLOAT, TEXT, PATH, DIR, ... for an option without a metavar (not `<int range>`, `INTEGER RANGE`)."""
    display_type = getattr(param, "display_type", None)
    label = display_type(ctx).strip("<>") if display_type is not None else param.type.name  # `integer range`
    label = label.replace(" range", "")
    return {"str": "TEXT", "text": "TEXT", "integer": "INT", "directory": "DIR"}.get(label, label).upper()


def _largest(param: Any) -> Any:
    """The option's upper bound (`max=`), or None."""
    return param.max if hasattr(param, "max") else getattr(param.type, "max", None)


def _shown_type(param: Any, ctx: Any) -> str | None:
    """The value column of an option's row: its metavar, `<a|b>` for short choices, nothing for a flag."""
    if isinstance(param, TyperArgument):
        return None  # an argument is shown by its metavar, in the name column
    own = getattr(param, "display_type_rich", None)
    if own is not None:  # newer typer
        return own(ctx=ctx)
    if param.metavar is not None:
        return param.metavar
    if param.is_flag or param.count:
        return None
    choices = _choices(param)
    if choices is not None:
        return f"<{'|'.join(choices)}>" + ("..." if param.nargs != 1 else "")
    return _type_label(param, ctx)


def _range_text(param: Any) -> str | None:
    """`8<=x<=512` for a number option with a range worth showing (see `_tidy`), else None."""
    own = getattr(param, "_get_number_range_help_str", None)  # newer typer, or set by `_tidy`
    if own is not None:
        return own()
    describe = getattr(param.type, "_describe_range", None)  # typer 0.20: click.IntRange / FloatRange
    if describe is None or isinstance(param, TyperArgument) or getattr(param, "count", False):
        return None
    return describe() or None


def _tidy(param: Any, ctx: Any) -> None:
    """How a parameter shows in help, compactly enough for 80 columns.

    Flags have no value placeholder (`--force`, not `--force <bool>`); values are INT, FLOAT, PATH...
    (not `<int range>`); short choices stay `<a|b>` and long ones are listed in the help ("One of:
    ..."); arguments show as their metavar (`DUMP...`, not `{DUMP...}...` and `<list[Path]>`); the
    default ends the help text on the same line (`[default: the dataset's own]` for a textual one);
    and a range is shown only when it is short (not `[0<=x<=9223372036854775807]`).
    """
    if getattr(param, "_precode_tidy", False) or not (_is_option(param) or isinstance(param, TyperArgument)):
        return
    param._precode_tidy = True
    help_text = param.help or ""
    if _is_option(param):
        choices = _choices(param)
        if param.is_flag or param.count:
            param.metavar = "" if param.metavar is None else param.metavar
        elif param.metavar is None and choices is not None:
            if len("|".join(choices)) > MAX_CHOICES_SHOWN:
                param.metavar = "NAME"
                if not all(choice in help_text for choice in choices):
                    help_text = f"{help_text} One of: {', '.join(choices)}."
        elif param.metavar is None:
            param.metavar = _type_label(param, ctx)
        largest = _largest(param)
        if largest is None or len(str(largest)) > 4:  # `[x>=1]` is noise, `[0<=x<=2**63-1]` unreadable
            param._get_number_range_help_str = lambda: None
    else:
        help_text = help_text or _declared_help(param, ctx)
        if param.metavar:
            shown = param.metavar
            param.display_type_rich = lambda ctx: None
            param.get_usage_pieces = lambda ctx: [shown]
    default = _default_text(param, ctx)
    if default:
        help_text = f"{help_text} [dim]\\[default: {escape(default)}][/dim]"
    param.help, param.show_default = help_text.strip(), False


def _declared_help(param: Any, ctx: Any) -> str:
    """An argument's `help=` as declared in the command's signature.

    typer 0.20 sets TyperArgument.help before calling click's Argument.__init__, and click 8.5
    (which takes `help` for arguments too) then resets it to None: the help is read again here.
    """
    from typer.utils import get_params_from_function

    callback = getattr(ctx.command, "callback", None)
    try:
        declared = get_params_from_function(callback).get(param.name) if callback is not None else None
    except Exception:  # noqa: BLE001 - a signature typer itself could not read: no help, as before
        return ""
    return getattr(getattr(declared, "default", None), "help", None) or ""


def _default_text(param: Any, ctx: Any) -> str:
    """The default as typer would show it ("" for none), a textual `show_default` as written."""
    if isinstance(param.show_default, str):
        return param.show_default
    if not hasattr(param, "_extract_default_help_str"):  # click's own --help option (typer 0.20)
        return ""
    value = param._extract_default_help_str(ctx=ctx)
    if value is None or not (param.show_default or ctx.show_default):
        return ""
    return param._get_default_string(ctx=ctx, show_default_is_str=False, default_value=value)


def _types_highlighter(ru: Any) -> Any:
    """typer's highlighter of the value column: `<`, `|`, `>` and `[...]` dimmed."""
    if hasattr(ru, "types_highlighter"):  # newer typer
        return ru.types_highlighter
    from rich.highlighter import RegexHighlighter

    class MetavarHighlighter(RegexHighlighter):  # what typer 0.20 builds in its _print_options_panel
        highlights = [r"^(?P<metavar_sep>(\[|<))", r"(?P<metavar_sep>\|)", r"(?P<metavar_sep>(\]|>))(\.\.\.)?$"]

    return MetavarHighlighter()


def _compact_panel(*, name: str, params: list[Any], ctx: Any, markup_mode: Any, console: Any) -> None:
    """typer's options panel in three columns (option, value, help) instead of seven mostly empty ones.

    typer keeps columns for short, negative and negative-short names, which at 80 columns leaves the
    help text a third of the width; here `-h` follows `--help` and `--no-x` goes under `--x`.
    """
    from rich import box
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text
    from typer import rich_utils as ru

    if not params:
        return
    highlight_types = _types_highlighter(ru)
    table = Table(highlight=True, show_header=False, expand=True, box=None, pad_edge=False, padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(ratio=1)
    for param in params:
        names = [o for o in param.opts if o.startswith("--")] or list(param.opts)
        if isinstance(param, TyperArgument):
            names = [param.metavar or param.name.upper()]
        shorts = [o for o in param.opts if not o.startswith("--") and _is_option(param)]
        label = Text(", ".join([*names, *shorts]))
        for negative in getattr(param, "secondary_opts", ()):
            label.append("\n" + negative)
        if param.required:
            label.append(" *", style=ru.STYLE_REQUIRED_SHORT)
        kind = Text(style=getattr(ru, "STYLE_TYPES", None) or ru.STYLE_METAVAR)  # STYLE_METAVAR in typer 0.20
        shown = _shown_type(param, ctx)
        if shown:
            kind.append(shown)
        bounds = _range_text(param)
        if bounds:
            kind.append(f" [{bounds}]")
        table.add_row(ru.highlighter(label), highlight_types(kind),
                      ru._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode))
    console.print(Panel(table, border_style=ru.STYLE_OPTIONS_PANEL_BORDER, title=name,
                        title_align=ru.ALIGN_OPTIONS_PANEL, box=box.ROUNDED))


class _Tidy:
    """Shared by the group and the commands: tidy every parameter (help option included), compact panels."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            try:
                _tidy(param, ctx)
            except (AttributeError, TypeError):  # a typer without these internals: its own rendering
                pass
        return params

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from typer import rich_utils

        original = getattr(rich_utils, "_print_options_panel", None)
        if original is None:  # another typer: its own layout
            return super().format_help(ctx, formatter)  # type: ignore[misc]
        rich_utils._print_options_panel = _compact_panel
        try:
            return super().format_help(ctx, formatter)  # type: ignore[misc]
        finally:
            rich_utils._print_options_panel = original


class PrecodeCommand(_Tidy, TyperCommand):
    """A command with compact help panels, its -h/--help in the "Output and run" panel."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.rich_help_panel = opt.PANEL_RUN
        return option


def _choice_error(err: Any) -> str | None:
    """A value outside an option's choices, worded as the stages word it: unknown --device 'tpu'; choose one of: ..."""
    match = re.fullmatch(r"(?:Value error, )?('.*'|\".*\") is not one of (.*?)\.?", str(getattr(err, "message", "")))
    flags = [o for o in getattr(getattr(err, "param", None), "opts", ()) if o.startswith("--")]
    if match is None or not flags:
        return None
    choices = ", ".join(re.findall(r"'([^']*)'", match.group(2)))
    return f"unknown {flags[0]} {match.group(1)}; choose one of: {choices}"


class OneLineErrors(_Tidy, TyperGroup):
    """A bad option or value is one sentence and exit code 2, like every other user error.

    Also: `--debug` is accepted after the command too (`precode attack x --debug`), and old option
    names (DEPRECATED) are rewritten to the new ones with a note.
    """

    def main(self, args: Sequence[str] | None = None, *rest: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            args = self._rewrite(list(sys.argv[1:] if args is None else args))
            result = super().main(args, *rest, standalone_mode=False, **kwargs)
        except UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # `precode attack` alone: show the help
                typer.echo(err.ctx.get_help() if err.ctx is not None else "")
                code = 2
            else:
                where = f"; see `{err.ctx.command_path} --help`" if err.ctx is not None else ""
                message = _choice_error(err) or f"{err.format_message().replace('Value error, ', '').rstrip('.')}{where}"
                typer.echo(f"Error: {message}.", err=True)
                code = err.exit_code
            if not standalone_mode:
                raise
            sys.exit(code)
        except typer.Abort:
            if not standalone_mode:
                raise
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result

    def _rewrite(self, args: list[str]) -> list[str]:
        """Move a `--debug` given after the command to before it, and rename deprecated options.

        Only the command's own options are looked at: never a token after `--`, nor the value of an
        option that takes one (`--note --debug` keeps its note).
        """
        at = next((i for i, token in enumerate(args) if not token.startswith("-")), None)
        if at is None or "--" in args[:at] or args[at] not in self.commands:
            return args
        name, command = args[at], self.commands[args[at]]
        takes_value = {flag for p in command.params if isinstance(p, TyperOption) and not (p.is_flag or p.count)
                       for flag in p.opts}
        renamed, debug, kept = DEPRECATED.get(name, {}), False, args[: at + 1]
        noted: set[str] = set()
        i = at + 1
        while i < len(args):
            token = args[i]
            if token == "--":
                kept.extend(args[i:])
                break
            flag, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
            if flag in renamed:
                if flag not in noted:
                    noted.add(flag)
                    typer.echo(f"Note: {flag} in {name} is deprecated; use {renamed[flag]}.", err=True)
                flag = renamed[flag]
                token = flag + eq + value
            if token == "--debug":
                debug = True
            else:
                kept.append(token)
                if flag in takes_value and not eq and i + 1 < len(args):
                    kept.append(args[i + 1])
                    i += 1
            i += 1
        return [*kept[:at], "--debug", *kept[at:]] if debug else kept


app = typer.Typer(
    name="precode",
    cls=OneLineErrors,
    help=(
        "Gradient-leakage attacks and defenses (PRECODE and its peers) as stages connected by files: "
        "train -> capture-gradients -> attack -> evaluate. Each command's --help says what it reads and writes; "
        "docs/cli.md has them all.\n\n"
        "Example: precode capture-gradients --model mlp --indices 0:4 --out grads && "
        "precode attack grads --iterations 1000 --out recon && precode evaluate recon --truth grads --out report"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"precode {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug",
                               help="Show full tracebacks instead of one-line errors (also after the command)."),
    version: bool = typer.Option(False, "-V", "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """precode: how much of a client's training data leaks through the gradients it shares."""
    STATE["debug"] = debug


app.command("train", cls=PrecodeCommand)(train)
app.command("capture-gradients", cls=PrecodeCommand)(capture_gradients)
app.command("attack", cls=PrecodeCommand)(attack)
app.command("evaluate", cls=PrecodeCommand)(evaluate)


def main() -> None:
    """Console-script entry point."""
    app()

"""The `precode` command-line app: four stages connected by files.

    precode train               -> RUN_DIR/model.safetensors, run.yaml, history.json
    precode capture-gradients   -> GRADS_DIR/<id>.safetensors (+ <id>.truth.safetensors)
    precode attack              -> RECON_DIR/<id>.safetensors
    precode evaluate            -> REPORT_DIR/metrics.json, metrics.csv, grid.png, report.md
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from precode_cli import __version__
from precode_cli.cli_support import STATE
from precode_cli.commands.attack import attack
from precode_cli.commands.capture import capture_gradients
from precode_cli.commands.evaluate import evaluate
from precode_cli.commands.train import train

# click's usage-error class, reached through typer's public API (typer vendors its own click).
UsageError = typer.BadParameter.__mro__[1]


class OneLineErrors(TyperGroup):
    """A bad option or value is one sentence and exit code 2, like every other user error."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # `precode attack` alone: show the help
                typer.echo(err.ctx.get_help() if err.ctx is not None else "")
                code = 2
            else:
                where = f"; see `{err.ctx.command_path} --help`" if err.ctx is not None else ""
                typer.echo(f"Error: {err.format_message().rstrip('.')}{where}.", err=True)
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
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"precode {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version."),
) -> None:
    """precode: how much of a client's training data leaks through the gradients it shares."""
    STATE["debug"] = debug


app.command("train")(train)
app.command("capture-gradients")(capture_gradients)
app.command("attack")(attack)
app.command("evaluate")(evaluate)


def main() -> None:
    """Console-script entry point."""
    app()

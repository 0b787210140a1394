"""The `precode` command-line app: four stages connected by files.

    precode train               -> RUN_DIR/model.safetensors, run.yaml, history.json
    precode capture-gradients   -> GRADS_DIR/<id>.safetensors (+ <id>.truth.safetensors)
    precode attack              -> RECON_DIR/<id>.safetensors
    precode evaluate            -> REPORT_DIR/metrics.json, metrics.csv, grid.png, report.md
"""

from __future__ import annotations

import typer

from precode_cli import __version__
from precode_cli.cli_support import STATE
from precode_cli.commands.attack import attack
from precode_cli.commands.capture import capture_gradients
from precode_cli.commands.evaluate import evaluate
from precode_cli.commands.train import train

app = typer.Typer(
    name="precode",
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

"""`precode train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from precode_cli.cli_support import cli_command, config_option
from precode_cli.commands import options as opt


@cli_command
def train(
    dataset: str = typer.Option("builtin", "--dataset", help="builtin (no download) or imagefolder."),
    data_dir: Optional[Path] = opt.DATA_DIR,
    model: str = typer.Option("mlp", "--model", help="Architecture: mlp (the PRECODE paper's MLP)."),
    defense: str = typer.Option("none", "--defense", help="none or precode."),
    precode_k: int = opt.PRECODE_K,
    precode_beta: float = opt.PRECODE_BETA,
    epochs: int = typer.Option(3, "--epochs", min=0, help="Passes over the training split."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Training batch size."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    seed: int = opt.SEED,
    out: Path = opt.out_option("RUN_DIR"),
    force: bool = opt.FORCE,
    config: Optional[Path] = config_option(),
) -> None:
    """Train a model, with or without a defense, and save it for capture-gradients.

    Reads: the dataset (builtin needs nothing; imagefolder reads --data-dir).

    Writes: RUN_DIR/model.safetensors (weights; model spec, defense and data in its metadata), RUN_DIR/run.yaml (the full resolved configuration) and RUN_DIR/history.json (loss and accuracy per epoch, train and test).

    Example: precode train --model mlp --defense precode --epochs 3 --out runs/mlp-precode
    """
    options = dict(locals())
    from precode_cli.stages.train import run_train

    run_train(options)

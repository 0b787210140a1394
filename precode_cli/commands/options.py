"""Options that several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

FORCE = typer.Option(False, "--force", help="Overwrite results already in the output directory.")
SEED = typer.Option(0, "--seed", help="Seed for every random choice; the same seed gives the same tensors.")
DATA_DIR = typer.Option(None, "--data-dir", help="Folder of the dataset (for imagefolder: one sub-folder per class).")
PRECODE_K = typer.Option(256, "--precode-k", min=1, help="PRECODE: number of latent Gaussians K.")
PRECODE_BETA = typer.Option(1e-3, "--precode-beta", min=0.0, help="PRECODE: weight beta of the KL term in the loss.")


def out_option(metavar: str) -> Optional[Path]:
    """The required --out directory."""
    return typer.Option(..., "--out", metavar=metavar, help=f"Directory to write into ({metavar}).")

"""Options that several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

FORCE = typer.Option(False, "--force", help="Overwrite results already in the output directory.")
SEED = typer.Option(0, "--seed", help="Seed for every random choice; the same seed gives the same tensors.")
DATA_DIR = typer.Option(
    None, "--data-dir",
    help="Where the dataset lives: a folder (imagefolder: one sub-folder per class; cifar10/100, mnist, "
         "fashion-mnist: their official files) or, for tensors, a .safetensors file.",
)
IMAGE_SIZE = typer.Option(
    None, "--image-size", min=8, max=512,
    help="Resize images to this many pixels square (default: the dataset's own size; imagefolder 32).",
)
CHANNELS = typer.Option(None, "--channels", min=1, max=3, help="1 (grayscale) or 3 (colour); default: the dataset's own.")
DOWNLOAD = typer.Option(False, "--download", help="Fetch cifar10, cifar100, mnist or fashion-mnist into --data-dir.")
WIDTH = typer.Option(None, "--width", min=1, help="Width of mlp (1024), cnn (32) or convnet (64); default in brackets.")
NORM = typer.Option(None, "--norm", help="resnet18's normalisation: batch (default) or group.")
PRECODE_K = typer.Option(256, "--precode-k", min=1, help="PRECODE: number of latent Gaussians K.")
PRECODE_BETA = typer.Option(1e-3, "--precode-beta", min=0.0, help="PRECODE: weight beta of the KL term in the loss.")
PRECODE_AT = typer.Option(
    None, "--precode-at", metavar="MODULE",
    help="PRECODE: insert the bottleneck before this submodule (default: the last nn.Linear), e.g. layer4 or features.3.",
)
STATS = typer.Option(
    None, "--stats", metavar="DATASET",
    help="Normalise with this dataset's published statistics (cifar10, cifar100, mnist, fashion-mnist), e.g. for CIFAR-10 "
         "images read as imagefolder or tensors; default: the dataset's own (published, else computed on its training split).",
)
MODELS_HELP = "mlp, cnn, lenet, convnet, resnet18, or your own package.module:builder"


def out_option(metavar: str) -> Optional[Path]:
    """The required --out directory."""
    return typer.Option(..., "--out", metavar=metavar, help=f"Directory to write into ({metavar}).")

"""Options that several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from precode_cli.limits import MAX_K, MAX_WIDTH

FORCE = typer.Option(False, "--force", help="Overwrite results already in the output directory.")
MAX_MEMORY = typer.Option(
    8.0, "--max-memory", metavar="GIB", min=0.000001,
    help="Refuse, before any work, what would need more memory than this many GiB (estimated from the files' "
         "declared model and batch; see docs/security.md).",
)
SEED = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed for every random choice; the same seed gives the same tensors.")
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
WIDTH = typer.Option(None, "--width", min=1, max=MAX_WIDTH, help="Width of mlp (1024), cnn (32) or convnet (64); default in brackets.")
NORM = typer.Option(None, "--norm", help="resnet18's normalisation: batch (default) or group.")
DEFENSE = typer.Option(
    None, "--defense", metavar="NAME",
    help="Defense: none, precode, noise, prune, dp, soteria or ppp; repeat (or separate with commas) to combine, "
         "e.g. --defense precode --defense noise. Default: none.",
)
PRECODE_K = typer.Option(None, "--precode-k", min=1, max=MAX_K, help="precode/ppp: number of latent Gaussians K (default 256).")
PRECODE_BETA = typer.Option(
    None, "--precode-beta", min=0.0, help="precode/ppp: weight beta of the KL term in the loss (default 0.001)."
)
PRECODE_AT = typer.Option(
    None, "--precode-at", metavar="MODULE",
    help="precode/ppp: insert the bottleneck before this submodule (default: the last nn.Linear), e.g. layer4 or features.3.",
)
NOISE_SCALE = typer.Option(
    None, "--noise-scale", help="noise: standard deviation (gaussian) or scale b (laplace) of the added noise (default 0.01)."
)
NOISE_DISTRIBUTION = typer.Option(None, "--noise-distribution", help="noise: gaussian (default) or laplace.")
PRUNE_KEEP = typer.Option(
    None, "--prune-keep", help="prune: fraction of each gradient tensor's entries kept, the largest by magnitude (default 0.7)."
)
DP_CLIP = typer.Option(None, "--dp-clip", help="dp: per-example gradient L2 clipping norm C (default 1.0).")
DP_SIGMA = typer.Option(None, "--dp-sigma", help="dp: noise multiplier sigma; the noise's std is sigma * C (default 1.0).")
DP_DELTA = typer.Option(None, "--dp-delta", help="dp: delta at which epsilon is reported (default 1e-5).")
SOTERIA_PERCENT = typer.Option(
    None, "--soteria-percent", help="soteria: percent of the representation's features whose gradient is pruned (default 1)."
)
SOTERIA_LAYER = typer.Option(
    None, "--soteria-layer", metavar="MODULE", help="soteria: the nn.Linear whose input is the representation (default: the last)."
)
PPP_CLIP = typer.Option(None, "--ppp-clip", help="ppp: L2 norm the perturbed gradients are clipped to (default 1.0).")
PPP_SIGMA = typer.Option(None, "--ppp-sigma", help="ppp: noise multiplier; the noise's std is sigma * clip (default 0.1).")
PPP_PARAMS = typer.Option(
    None, "--ppp-params", metavar="NAME,...",
    help="ppp: the parameters to clip and noise (default: the layers before the bottleneck's sample and its encoder).",
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

"""Options that several commands share, declared once, and the help panels they are shown in.

Options with a fixed set of values are typed as `Literal[...]`: typer lists the values in the help and
refuses any other value as a usage error, and the stages still receive plain strings. Defaults that
depend on something else (the dataset, the model, the method) are shown as text with `show_default`.
Details belong in docs/cli.md; the help says what an option is, its values and its default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from precode_cli.limits import MAX_K, MAX_WIDTH

# Help panels, in the order a reader needs them.
PANEL_DATA = "Data"
PANEL_MODEL = "Model"
PANEL_DEFENSE = "Defense"
PANEL_TRAINING = "Training"
PANEL_FEDERATED = "Federated (FedAvg)"
PANEL_ATTACK = "Attack"
PANEL_SCORING = "Scoring"
PANEL_RUN = "Output and run"

# Options with a fixed set of values (each list must match the one the stage checks).
Dataset = Literal["builtin", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "tensors"]
Stats = Literal["cifar10", "cifar100", "mnist", "fashion-mnist"]
Norm = Literal["batch", "group"]
NoiseDistribution = Literal["gaussian", "laplace"]
SoteriaRule = Literal["count", "gs"]
CVBKL = Literal["gaussian", "authors"]
Optimizer = Literal["adam", "sgd"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Split = Literal["train", "test", "all"]
Pick = Literal["first", "random"]
Mode = Literal["train", "eval"]
Threat = Literal["honest", "imprint"]
ImprintMeasurement = Literal["mean", "random"]
Method = Literal["ig", "ig-adaptive", "ig-noise", "dlg", "idlg", "analytic", "ig-bn", "imprint"]
Preset = Literal["precode", "geiping", "fast"]
Init = Literal["randn", "rand", "zeros"]
Space = Literal["pixel", "normalized"]

SHARD = typer.Option(
    None, "--shard", metavar="K/N", rich_help_panel=PANEL_RUN, show_default="all the work",
    help="Do only slice K (0..N-1) of N, for job arrays; every shard writes into the same --out.",
)
FORCE = typer.Option(False, "--force", help="Overwrite results already in --out.", rich_help_panel=PANEL_RUN)
MAX_MEMORY = typer.Option(
    8.0, "--max-memory", metavar="GIB", min=0.000001, rich_help_panel=PANEL_RUN,
    help="Refuse, before any work, what would need more memory than this (see docs/security.md).",
)
SEED = typer.Option(0, "--seed", min=0, max=2**63 - 1, rich_help_panel=PANEL_RUN, metavar="INT",
                    help="Seed for every random choice; the same seed gives the same tensors.")
DATA_DIR = typer.Option(
    None, "--data-dir", metavar="PATH", rich_help_panel=PANEL_DATA, show_default="none",
    help="The dataset's folder, or for tensors a .safetensors file; builtin needs none.",
)
IMAGE_SIZE = typer.Option(
    None, "--image-size", min=8, max=512, rich_help_panel=PANEL_DATA, show_default="the dataset's own; imagefolder 32",
    help="Resize images to this many pixels square.",
)
CHANNELS = typer.Option(None, "--channels", min=1, max=3, rich_help_panel=PANEL_DATA, show_default="the dataset's own",
                        help="1 (grayscale) or 3 (colour).")
DOWNLOAD = typer.Option(False, "--download", rich_help_panel=PANEL_DATA,
                        help="Fetch cifar10, cifar100, mnist or fashion-mnist into --data-dir.")
WIDTH = typer.Option(None, "--width", min=1, max=MAX_WIDTH, rich_help_panel=PANEL_MODEL,
                     show_default="mlp 1024, cnn 32, convnet 64", help="Width of mlp, cnn or convnet.")
NORM = typer.Option(None, "--norm", rich_help_panel=PANEL_MODEL, show_default="batch", help="resnet18's normalisation.")
DEFENSE = typer.Option(
    None, "--defense", metavar="NAME", rich_help_panel=PANEL_DEFENSE, show_default="none",
    help="none, precode, noise, prune, dp, soteria, ppp or cvb; repeat (or use commas) to combine, in order.",
)
PRECODE_K = typer.Option(None, "--precode-k", min=1, max=MAX_K, rich_help_panel=PANEL_DEFENSE, show_default="256",
                         help="precode/ppp: number of latent Gaussians K.")
PRECODE_BETA = typer.Option(None, "--precode-beta", min=0.0, rich_help_panel=PANEL_DEFENSE, show_default="0.001",
                            help="precode/ppp: weight of the KL term.")
PRECODE_AT = typer.Option(
    None, "--precode-at", metavar="MODULE", rich_help_panel=PANEL_DEFENSE, show_default="the last nn.Linear",
    help="precode/ppp: put the bottleneck before this submodule.",
)
NOISE_SCALE = typer.Option(None, "--noise-scale", rich_help_panel=PANEL_DEFENSE, show_default="0.01",
                           help="noise: std (gaussian) or scale b (laplace).")
NOISE_DISTRIBUTION = typer.Option(None, "--noise-distribution", rich_help_panel=PANEL_DEFENSE, show_default="gaussian",
                                  help="noise: the noise's distribution.")
PRUNE_KEEP = typer.Option(None, "--prune-keep", rich_help_panel=PANEL_DEFENSE, show_default="0.7",
                          help="prune: fraction of each gradient kept (largest entries).")
DP_CLIP = typer.Option(None, "--dp-clip", rich_help_panel=PANEL_DEFENSE, show_default="1.0",
                       help="dp: per-example clipping norm C.")
DP_SIGMA = typer.Option(None, "--dp-sigma", rich_help_panel=PANEL_DEFENSE, show_default="1.0",
                        help="dp: noise multiplier (std sigma * C).")
DP_DELTA = typer.Option(None, "--dp-delta", rich_help_panel=PANEL_DEFENSE, show_default="1e-5",
                        help="dp: delta of the reported epsilon.")
SOTERIA_PERCENT = typer.Option(None, "--soteria-percent", rich_help_panel=PANEL_DEFENSE, show_default="1",
                               help="soteria: percent of features pruned.")
SOTERIA_LAYER = typer.Option(None, "--soteria-layer", metavar="MODULE", rich_help_panel=PANEL_DEFENSE,
                             show_default="the last nn.Linear", help="soteria: the layer whose input is pruned.")
SOTERIA_RULE = typer.Option(None, "--soteria-rule", rich_help_panel=PANEL_DEFENSE, show_default="count",
                            help="soteria: count (prune percent% of the features, live ones first) or gs (the "
                                 "authors' GS script: below the scores' percentile; see docs/defenses.md).")
PPP_CLIP = typer.Option(None, "--ppp-clip", rich_help_panel=PANEL_DEFENSE, show_default="1.0",
                        help="ppp: clipping norm of the perturbed gradients.")
PPP_SIGMA = typer.Option(None, "--ppp-sigma", rich_help_panel=PANEL_DEFENSE, show_default="0.1",
                         help="ppp: noise multiplier (std sigma * clip).")
PPP_PARAMS = typer.Option(
    None, "--ppp-params", metavar="NAME,...", rich_help_panel=PANEL_DEFENSE, show_default="the layers before the sample",
    help="ppp: the parameters to clip and noise.",
)
CVB_CHANNELS = typer.Option(None, "--cvb-channels", min=1, max=MAX_K, rich_help_panel=PANEL_DEFENSE,
                            show_default="half the map's, 8 below 8", help="cvb: latent channels K.")
CVB_BETA = typer.Option(None, "--cvb-beta", min=0.0, rich_help_panel=PANEL_DEFENSE, show_default="0.1",
                        help="cvb: weight of the KL term.")
CVB_AT = typer.Option(
    None, "--cvb-at", metavar="MODULE", rich_help_panel=PANEL_DEFENSE, show_default="after the first conv block",
    help="cvb: put the bottleneck before this submodule.",
)
CVB_KL = typer.Option(
    None, "--cvb-kl", rich_help_panel=PANEL_DEFENSE, show_default="gaussian",
    help="cvb: the loss's KL term: gaussian (of the distribution sampled) or authors (their code's term).",
)
STATS = typer.Option(
    None, "--stats", rich_help_panel=PANEL_DATA, show_default="the dataset's own",
    help="Normalise with this dataset's published mean and std.",
)
MODELS_HELP = "mlp, cnn, lenet, convnet, resnet18, or your own package.module:builder"


def out_option(metavar: str) -> Optional[Path]:
    """The required --out directory."""
    return typer.Option(..., "--out", metavar=metavar, rich_help_panel=PANEL_RUN, help="Directory to write into.")

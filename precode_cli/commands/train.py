"""`precode train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from precode_cli.cli_support import cli_command, config_option
from precode_cli.commands import options as opt
from precode_cli.limits import MAX_EPOCHS


@cli_command
def train(
    dataset: opt.Dataset = typer.Option("builtin", "--dataset", rich_help_panel=opt.PANEL_DATA,
                                        help="builtin (no download), cifar10, cifar100, mnist, fashion-mnist, "
                                             "imagefolder or tensors."),
    data_dir: Optional[Path] = opt.DATA_DIR,
    image_size: Optional[int] = opt.IMAGE_SIZE,
    channels: Optional[int] = opt.CHANNELS,
    download: bool = opt.DOWNLOAD,
    stats: Optional[opt.Stats] = opt.STATS,
    subset: Optional[int] = typer.Option(None, "--subset", min=1, rich_help_panel=opt.PANEL_DATA, show_default="all",
                                         help="Train on N images of the training split (a fixed choice)."),
    model: str = typer.Option("mlp", "--model", metavar="NAME", rich_help_panel=opt.PANEL_MODEL,
                              help=f"Architecture: {opt.MODELS_HELP}."),
    width: Optional[int] = opt.WIDTH,
    norm: Optional[opt.Norm] = opt.NORM,
    defense: Optional[list[str]] = opt.DEFENSE,
    precode_k: Optional[int] = opt.PRECODE_K,
    precode_beta: Optional[float] = opt.PRECODE_BETA,
    precode_at: Optional[str] = opt.PRECODE_AT,
    noise_scale: Optional[float] = opt.NOISE_SCALE,
    noise_distribution: Optional[opt.NoiseDistribution] = opt.NOISE_DISTRIBUTION,
    prune_keep: Optional[float] = opt.PRUNE_KEEP,
    dp_clip: Optional[float] = opt.DP_CLIP,
    dp_sigma: Optional[float] = opt.DP_SIGMA,
    dp_delta: Optional[float] = opt.DP_DELTA,
    soteria_percent: Optional[float] = opt.SOTERIA_PERCENT,
    soteria_layer: Optional[str] = opt.SOTERIA_LAYER,
    soteria_rule: Optional[opt.SoteriaRule] = opt.SOTERIA_RULE,
    ppp_clip: Optional[float] = opt.PPP_CLIP,
    ppp_sigma: Optional[float] = opt.PPP_SIGMA,
    ppp_params: Optional[str] = opt.PPP_PARAMS,
    cvb_channels: Optional[int] = opt.CVB_CHANNELS,
    cvb_beta: Optional[float] = opt.CVB_BETA,
    cvb_at: Optional[str] = opt.CVB_AT,
    cvb_kl: Optional[opt.CVBKL] = opt.CVB_KL,
    optimizer: opt.Optimizer = typer.Option("adam", "--optimizer", rich_help_panel=opt.PANEL_TRAINING,
                                            help="Adam, or SGD with --momentum."),
    lr: float = typer.Option(1e-3, "--lr", rich_help_panel=opt.PANEL_TRAINING, help="Learning rate."),
    momentum: float = typer.Option(0.9, "--momentum", rich_help_panel=opt.PANEL_TRAINING, help="SGD's momentum."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", rich_help_panel=opt.PANEL_TRAINING, help="L2 weight decay."),
    epochs: int = typer.Option(3, "--epochs", min=0, max=MAX_EPOCHS, rich_help_panel=opt.PANEL_TRAINING,
                               help="Passes over the training split (with --resume: the total)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, rich_help_panel=opt.PANEL_TRAINING,
                                   help="The client's batch: images per training step."),
    device: opt.Device = typer.Option("auto", "--device", rich_help_panel=opt.PANEL_TRAINING,
                                      help="auto: cuda, else mps, else cpu."),
    checkpoint_every: int = typer.Option(
        0, "--checkpoint-epochs", min=0, metavar="N", rich_help_panel=opt.PANEL_TRAINING,
        help="Keep the model every N epochs, and before the first, in checkpoints/ (0: never).",
    ),
    resume: bool = typer.Option(False, "--resume", rich_help_panel=opt.PANEL_TRAINING,
                                help="Continue the run in RUN_DIR from its last finished epoch."),
    seed: int = opt.SEED,
    out: Path = opt.out_option("RUN_DIR"),
    force: bool = opt.FORCE,
    max_memory: float = opt.MAX_MEMORY,
    config: Optional[Path] = config_option(),
) -> None:
    """Train a model, with or without a defense, for capture-gradients.

    Reads: the dataset (builtin needs nothing; the others --data-dir, or --download).

    Writes: RUN_DIR/model.safetensors, run.yaml, history.json, curves.png and checkpoints/ (see docs/cli.md).

    Example: precode train --model cnn --defense precode --epochs 3 --checkpoint-epochs 1 --out runs/cnn-precode
    """
    options = dict(locals())
    from precode_cli.stages.train import run_train

    run_train(options)

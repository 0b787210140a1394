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
    dataset: str = typer.Option(
        "builtin", "--dataset", help="builtin (no download), cifar10, cifar100, mnist, fashion-mnist, imagefolder or tensors."
    ),
    data_dir: Optional[Path] = opt.DATA_DIR,
    image_size: Optional[int] = opt.IMAGE_SIZE,
    channels: Optional[int] = opt.CHANNELS,
    download: bool = opt.DOWNLOAD,
    stats: Optional[str] = opt.STATS,
    subset: Optional[int] = typer.Option(None, "--subset", min=1, help="Train on N images of the training split (a fixed choice)."),
    model: str = typer.Option("mlp", "--model", help=f"Architecture: {opt.MODELS_HELP}."),
    width: Optional[int] = opt.WIDTH,
    norm: Optional[str] = opt.NORM,
    defense: Optional[list[str]] = opt.DEFENSE,
    precode_k: Optional[int] = opt.PRECODE_K,
    precode_beta: Optional[float] = opt.PRECODE_BETA,
    precode_at: Optional[str] = opt.PRECODE_AT,
    noise_scale: Optional[float] = opt.NOISE_SCALE,
    noise_distribution: Optional[str] = opt.NOISE_DISTRIBUTION,
    prune_keep: Optional[float] = opt.PRUNE_KEEP,
    dp_clip: Optional[float] = opt.DP_CLIP,
    dp_sigma: Optional[float] = opt.DP_SIGMA,
    dp_delta: Optional[float] = opt.DP_DELTA,
    soteria_percent: Optional[float] = opt.SOTERIA_PERCENT,
    soteria_layer: Optional[str] = opt.SOTERIA_LAYER,
    ppp_clip: Optional[float] = opt.PPP_CLIP,
    ppp_sigma: Optional[float] = opt.PPP_SIGMA,
    ppp_params: Optional[str] = opt.PPP_PARAMS,
    optimizer: str = typer.Option("adam", "--optimizer", help="adam or sgd."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
    momentum: float = typer.Option(0.9, "--momentum", help="SGD momentum (ignored by adam)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="L2 weight decay."),
    epochs: int = typer.Option(3, "--epochs", min=0, max=MAX_EPOCHS, help="Passes over the training split."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Training batch size."),
    device: str = typer.Option("auto", "--device", help="auto (cuda, then mps, then cpu), cpu, cuda or mps."),
    checkpoint_every: int = typer.Option(
        0, "--checkpoint-every", min=0, metavar="N",
        help="Also keep the model after every N epochs (and before the first) in checkpoints/, for capture-gradients.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in RUN_DIR from its last finished epoch."),
    seed: int = opt.SEED,
    out: Path = opt.out_option("RUN_DIR"),
    force: bool = opt.FORCE,
    max_memory: float = opt.MAX_MEMORY,
    config: Optional[Path] = config_option(),
) -> None:
    """Train a model, with or without a defense, and save it for capture-gradients.

    Reads: the dataset (builtin needs nothing; the others read --data-dir, or fetch it with --download).

    Writes: RUN_DIR/model.safetensors (final weights; model spec, defense and data in its metadata), RUN_DIR/run.yaml (the resolved options), RUN_DIR/history.json (loss, accuracy and median step time per epoch, train and test; dp's epsilon under privacy), RUN_DIR/curves.png, RUN_DIR/checkpoints/epoch-NNNN.safetensors (with --checkpoint-every) and RUN_DIR/checkpoints/resume.safetensors (for --resume).

    Example: precode train --model cnn --defense precode --epochs 3 --checkpoint-every 1 --out runs/cnn-precode

    Combined defenses: precode train --model mlp --defense precode --defense noise --noise-scale 0.01 --out runs/mlp-precode-noise

    DP-SGD, printing epsilon: precode train --model mlp --defense dp --dp-clip 1 --dp-sigma 1 --out runs/mlp-dp
    """
    options = dict(locals())
    from precode_cli.stages.train import run_train

    run_train(options)

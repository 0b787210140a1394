"""`precode capture-gradients`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from precode_cli.cli_support import cli_command, config_option
from precode_cli.commands import options as opt
from precode_cli.limits import MAX_BATCH


@cli_command
def capture_gradients(
    run_dir: Optional[Path] = typer.Argument(
        None, metavar="[RUN_DIR]",
        help="A run from `precode train`, or one of its model files (model.safetensors, checkpoints/epoch-N.safetensors). "
             "Without it: a freshly initialised model.",
    ),
    epoch: Optional[int] = typer.Option(
        None, "--epoch", min=0, help="Capture from RUN_DIR's checkpoint of this epoch (0: before training)."
    ),
    model: Optional[str] = typer.Option(
        None, "--model",
        help=f"Architecture of the untrained model (default mlp): {opt.MODELS_HELP}. With a run whose model is your own "
             "builder, repeat it here to allow importing it.",
    ),
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
    dataset: Optional[str] = typer.Option(
        None, "--dataset",
        help="Victims' dataset (default: the run's, else builtin): builtin, cifar10, cifar100, mnist, fashion-mnist, "
             "imagefolder or tensors.",
    ),
    data_dir: Optional[Path] = opt.DATA_DIR,
    image_size: Optional[int] = opt.IMAGE_SIZE,
    channels: Optional[int] = opt.CHANNELS,
    download: bool = opt.DOWNLOAD,
    stats: Optional[str] = opt.STATS,
    split: str = typer.Option("train", "--split", help="train, test or all."),
    indices: str = typer.Option("0:8", "--indices", metavar="START:STOP", help="Victims START..STOP-1 of the split."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, max=MAX_BATCH, help="Victims per shared gradient (one dump each)."),
    share_labels: bool = typer.Option(
        True, "--share-labels/--no-share-labels", help="Whether the client's labels go into the dump."
    ),
    mode: str = typer.Option("train", "--mode", help="Model mode at capture: train or eval."),
    seed: int = opt.SEED,
    out: Path = opt.out_option("GRADS_DIR"),
    force: bool = opt.FORCE,
    max_memory: float = opt.MAX_MEMORY,
    config: Optional[Path] = config_option(),
) -> None:
    """Capture the gradients a client would share, one dump per victim batch.

    Reads: RUN_DIR/model.safetensors if given, or the checkpoint --epoch picks (else builds a freshly initialised model from --model, --defense and --seed), and the victims' dataset.

    Writes: GRADS_DIR/<split>-<first index>.safetensors per batch (the shared gradient and the model state: the attacker's view) and beside it <split>-<first index>.truth.safetensors (the real images and labels, read only by evaluate).

    Example: precode capture-gradients runs/cnn-precode --epoch 1 --indices 0:8 --out grads/cnn-precode-epoch1
    """
    options = dict(locals())
    from precode_cli.errors import UserError
    from precode_cli.stages.capture import run_capture

    if mode not in ("train", "eval"):
        raise UserError(f"--mode must be train or eval, not {mode!r}.")
    run_capture(options)

"""`precode capture-gradients`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from precode_cli.cli_support import cli_command, config_option
from precode_cli.commands import options as opt
from precode_cli.limits import MAX_BATCH, MAX_IMPRINT_BINS, MAX_LOCAL_STEPS


@cli_command
def capture_gradients(
    run_dir: Optional[Path] = typer.Argument(
        None, metavar="[RUN_DIR]", show_default=False,
        help="A run from `precode train`, or one of its model files. Without it: a freshly initialised model.",
    ),
    epoch: Optional[int] = typer.Option(
        None, "--epoch", min=0, rich_help_panel=opt.PANEL_MODEL, show_default="the final model",
        help="Use RUN_DIR's checkpoint of this epoch (0: before training).",
    ),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="NAME", rich_help_panel=opt.PANEL_MODEL, show_default="the run's, else mlp",
        help=f"Architecture of an untrained model: {opt.MODELS_HELP}. For a run of your own builder, name it "
             "again to allow importing it.",
    ),
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
    dataset: Optional[opt.Dataset] = typer.Option(
        None, "--dataset", rich_help_panel=opt.PANEL_DATA, show_default="the run's, else builtin",
        help="The victims' dataset: builtin, cifar10, cifar100, mnist, fashion-mnist, imagefolder or tensors.",
    ),
    data_dir: Optional[Path] = opt.DATA_DIR,
    image_size: Optional[int] = opt.IMAGE_SIZE,
    channels: Optional[int] = opt.CHANNELS,
    download: bool = opt.DOWNLOAD,
    stats: Optional[opt.Stats] = opt.STATS,
    split: opt.Split = typer.Option("train", "--split", rich_help_panel=opt.PANEL_DATA,
                                    help="The split the victims come from (all: the whole set)."),
    indices: str = typer.Option("0:8", "--indices", metavar="START:STOP", rich_help_panel=opt.PANEL_DATA,
                                help="Victims START..STOP-1 of the split."),
    pick: opt.Pick = typer.Option(
        "first", "--pick", rich_help_panel=opt.PANEL_DATA,
        help="How --indices reads the split: first (its own order; class folders come sorted by class) or "
             "random (an order fixed by --seed, spanning the classes).",
    ),
    batch_size: int = typer.Option(1, "--batch-size", min=1, max=MAX_BATCH, rich_help_panel=opt.PANEL_DATA,
                                   help="The client's batch: victims per shared gradient (one dump each)."),
    share_labels: bool = typer.Option(
        True, "--share-labels/--no-share-labels", rich_help_panel=opt.PANEL_DATA,
        help="Whether the client's labels go into the dump.",
    ),
    local_steps: Optional[int] = typer.Option(
        None, "--local-steps", min=1, max=MAX_LOCAL_STEPS, metavar="N", rich_help_panel=opt.PANEL_FEDERATED,
        show_default="none: share one gradient (FedSGD)",
        help="Train locally for N SGD steps and write the weights the client sends back (FedAvg), one update file "
             "per client of --batch-size examples.",
    ),
    local_epochs: Optional[int] = typer.Option(
        None, "--local-epochs", min=1, max=MAX_LOCAL_STEPS, metavar="E", rich_help_panel=opt.PANEL_FEDERATED,
        show_default="none", help="Instead of --local-steps: E passes over the client's examples.",
    ),
    local_lr: Optional[float] = typer.Option(
        None, "--local-lr", min=0.0, rich_help_panel=opt.PANEL_FEDERATED, show_default="0.01",
        help="The client's SGD learning rate.",
    ),
    local_batch_size: Optional[int] = typer.Option(
        None, "--local-batch-size", min=1, max=MAX_BATCH, rich_help_panel=opt.PANEL_FEDERATED,
        show_default="all the client's examples", help="Examples per local step, taken in order, cycling.",
    ),
    momentum: Optional[float] = typer.Option(
        None, "--momentum", min=0.0, max=0.999999, rich_help_panel=opt.PANEL_FEDERATED, show_default="0",
        help="The client's SGD momentum (as train's).",
    ),
    weight_decay: Optional[float] = typer.Option(
        None, "--weight-decay", min=0.0, rich_help_panel=opt.PANEL_FEDERATED, show_default="0",
        help="The client's L2 weight decay (as train's).",
    ),
    mode: opt.Mode = typer.Option("train", "--mode", rich_help_panel=opt.PANEL_MODEL,
                                  help="The model's mode at capture (matters for BatchNorm)."),
    record_bn_stats: bool = typer.Option(
        False, "--record-bn-stats", rich_help_panel=opt.PANEL_MODEL,
        help="Also store every BatchNorm layer's batch mean and variance, which the client's update of the running "
             "statistics reveals (for --method ig-bn).",
    ),
    threat: opt.Threat = typer.Option(
        "honest", "--threat", rich_help_panel=opt.PANEL_MODEL,
        help="The server: honest (sends the model as it is) or imprint (a malicious server that puts an imprint "
             "module in front, for --method imprint).",
    ),
    imprint_bins: Optional[int] = typer.Option(
        None, "--imprint-bins", min=2, max=MAX_IMPRINT_BINS, metavar="N", rich_help_panel=opt.PANEL_MODEL,
        show_default="twice --batch-size, at least 128", help="--threat imprint: the module's bins.",
    ),
    imprint_measurement: Optional[opt.ImprintMeasurement] = typer.Option(
        None, "--imprint-measurement", rich_help_panel=opt.PANEL_MODEL, show_default="random",
        help="--threat imprint: what the bins measure: the pixels' mean, or a random direction.",
    ),
    format_version: int = typer.Option(
        2, "--format-version", min=1, max=2, rich_help_panel=opt.PANEL_RUN,
        help="2: the model state once in GRADS_DIR/states/ and Linear gradients as exact factors; 1: every dump "
             "whole, for older readers.",
    ),
    shard: Optional[str] = opt.SHARD,
    resume: bool = typer.Option(False, "--resume", rich_help_panel=opt.PANEL_RUN,
                                help="Keep the dumps an interrupted capture (or shard) finished; capture the rest."),
    seed: int = opt.SEED,
    out: Path = opt.out_option("GRADS_DIR"),
    force: bool = opt.FORCE,
    max_memory: float = opt.MAX_MEMORY,
    config: Optional[Path] = config_option(),
) -> None:
    """Capture the gradients a client would share, one dump per victim batch.

    Reads: RUN_DIR's model (or the --epoch checkpoint; without RUN_DIR a fresh model from --model, --defense and --seed) and the victims' dataset.

    Writes: GRADS_DIR/<split>-<first index>.safetensors per batch (what the server sees: a gradient dump, or with --local-steps a client update) and <split>-<first index>.truth.safetensors (the real images, read only by evaluate); GRADS_DIR/states/<sha256>.safetensors holds the model state the dumps share.

    Example: precode capture-gradients runs/cnn-precode --epoch 1 --indices 0:8 --out grads/cnn-precode-epoch1

    Example (a malicious server): precode capture-gradients --threat imprint --batch-size 8 --out grads/imprint

    Example (FedAvg, 3 local steps of one image each): precode capture-gradients --batch-size 3 --local-batch-size 1 --local-steps 3 --local-lr 0.1 --out updates
    """
    options = dict(locals())
    from precode_cli.stages.capture import run_capture

    run_capture(options)

"""`precode attack`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from precode_cli.cli_support import cli_command, config_option
from precode_cli.commands import options as opt
from precode_cli.limits import MAX_GROUP, MAX_ITERATIONS, MAX_RESTARTS


@cli_command
def attack(
    dumps: List[Path] = typer.Argument(
        ..., metavar="DUMP...", help="Gradient dumps, or GRADS_DIRs standing for every dump in them."
    ),
    method: str = typer.Option(
        "ig", "--method",
        help="ig (Inverting Gradients), ig-adaptive (leaves PRECODE's decoder and later layers out), ig-noise "
             "(optimises PRECODE's noise too), dlg, idlg, or analytic (exact, from a first Linear layer with bias).",
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="ig family: precode (the PRECODE paper's settings, default) or geiping (Inverting Gradients' CIFAR settings)."
    ),
    iterations: Optional[int] = typer.Option(
        None, "--iterations", min=1, max=MAX_ITERATIONS, help="Optimisation steps per victim (ig: 7000 with the precode preset; dlg/idlg: 300 L-BFGS steps)."
    ),
    lr: Optional[float] = typer.Option(None, "--lr", help="Step size (ig: 0.01 with the precode preset; dlg/idlg: 1)."),
    tv_weight: Optional[float] = typer.Option(
        None, "--tv-weight", min=0.0, help="ig family: weight of the total-variation prior (1e-6 with the precode preset)."
    ),
    restarts: Optional[int] = typer.Option(
        None, "--restarts", min=1, max=MAX_RESTARTS, help="ig family: random starts per victim; the one with the lowest matching loss is kept."
    ),
    init: Optional[str] = typer.Option(None, "--init", help="ig family: start from randn (default), rand (uniform pixels) or zeros."),
    ignore_layers: Optional[str] = typer.Option(
        None, "--ignore-layers", metavar="NAME,...",
        help="Leave these modules' parameter gradients out of the matching loss (ig family, dlg, idlg), e.g. classifier.",
    ),
    vectorize: int = typer.Option(
        16, "--vectorize", min=1, max=MAX_GROUP, help="ig family: attack up to this many dumps of one model at once (1: one by one)."
    ),
    checkpoint_every: int = typer.Option(
        500, "--checkpoint-every", min=0, metavar="N", help="ig family: save a checkpoint every N iterations (0: never)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted attack into the same RECON_DIR: finished dumps are skipped."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="PACKAGE.MODULE:BUILDER",
        help="Only for dumps of a model built by your own code: name that builder to allow importing it "
             "(a dump never makes precode import code on its own).",
    ),
    seed: int = opt.SEED,
    out: Path = opt.out_option("RECON_DIR"),
    force: bool = opt.FORCE,
    max_memory: float = opt.MAX_MEMORY,
    config: Optional[Path] = config_option(),
) -> None:
    """Reconstruct the victims behind gradient dumps. Never opens truth files.

    Reads: each DUMP (a *.safetensors file from capture-gradients; a directory stands for all dumps in it, truth files skipped).

    Writes: RECON_DIR/<dump name>.safetensors per dump: the reconstructed images in [0, 1], the labels used, the matching loss per iteration, and the attack's settings and seed; RECON_DIR/checkpoints/ while an ig-family attack runs (removed when it finishes).

    The ig default is the PRECODE paper's: Adam with lr 0.01 on the sign of the gradient, 7000 iterations, TV weight 1e-6, lr x0.1 at 3/8, 5/8 and 7/8 of the iterations, labels from the dump (else read off the output-layer bias gradient). Ctrl-C saves a checkpoint; --resume continues.

    Example: precode attack grads/mlp-precode --method ig-adaptive --iterations 2000 --out recon/mlp-precode-adaptive
    """
    options = dict(locals())
    from precode_cli.stages.attack import run_attack

    run_attack(options)

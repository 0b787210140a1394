"""`precode attack`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from precode_cli.cli_support import cli_command, config_option
from precode_cli.commands import options as opt


@cli_command
def attack(
    dumps: List[Path] = typer.Argument(
        ..., metavar="DUMP...", help="Gradient dumps, or GRADS_DIRs standing for every dump in them."
    ),
    method: str = typer.Option("ig", "--method", help="Attack: ig (Inverting Gradients)."),
    iterations: int = typer.Option(7000, "--iterations", min=1, help="Optimisation steps per victim batch."),
    lr: float = typer.Option(0.01, "--lr", help="Step size (Adam)."),
    tv_weight: float = typer.Option(1e-6, "--tv-weight", min=0.0, help="Weight of the total-variation prior."),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="PACKAGE.MODULE:BUILDER",
        help="Only for dumps of a model built by your own code: name that builder to allow importing it "
             "(a dump never makes precode import code on its own).",
    ),
    seed: int = opt.SEED,
    out: Path = opt.out_option("RECON_DIR"),
    force: bool = opt.FORCE,
    config: Optional[Path] = config_option(),
) -> None:
    """Reconstruct the victims behind gradient dumps. Never opens truth files.

    Reads: each DUMP (a *.safetensors file from capture-gradients; a directory stands for all dumps in it, truth files skipped).

    Writes: RECON_DIR/<dump name>.safetensors per dump: the reconstructed images in [0, 1], the labels used, the matching loss per iteration, and the attack's settings and seed.

    Defaults are the PRECODE paper's: Adam with lr 0.01 on the sign of the gradient, 7000 iterations, TV weight 1e-6, lr x0.1 at 3/8, 5/8 and 7/8 of the iterations, labels from the dump (else read off the output-layer bias gradient).

    Example: precode attack grads/mlp --method ig --iterations 1000 --out recon/mlp
    """
    options = dict(locals())
    from precode_cli.stages.attack import run_attack

    run_attack(options)

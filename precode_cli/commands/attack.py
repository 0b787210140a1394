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
        ..., metavar="DUMP...", help="Gradient dumps, or GRADS_DIRs standing for every dump in them.",
    ),
    method: opt.Method = typer.Option(
        "ig", "--method", rich_help_panel=opt.PANEL_ATTACK,
        help="ig (Inverting Gradients), ig-adaptive or ig-noise (ig against PRECODE), dlg, idlg, analytic, ig-bn "
             "(ig with the BatchNorm statistics a dump recorded), or imprint (a malicious server's imprint module).",
    ),
    preset: Optional[opt.Preset] = typer.Option(
        None, "--preset", rich_help_panel=opt.PANEL_ATTACK, show_default="precode",
        help="ig family: the PRECODE paper's settings, Inverting Gradients' CIFAR ones, or fast (1000 iterations, "
             "victims stop early when they stop improving).",
    ),
    iterations: Optional[int] = typer.Option(
        None, "--iterations", min=1, max=MAX_ITERATIONS, rich_help_panel=opt.PANEL_ATTACK,
        show_default="ig 7000, dlg/idlg 300", help="Optimisation steps per victim.",
    ),
    lr: Optional[float] = typer.Option(None, "--lr", rich_help_panel=opt.PANEL_ATTACK, show_default="ig 0.01, dlg/idlg 1",
                                       help="Step size."),
    tv_weight: Optional[float] = typer.Option(
        None, "--tv-weight", min=0.0, rich_help_panel=opt.PANEL_ATTACK, show_default="the preset's; precode 1e-6",
        help="ig family: weight of the total-variation prior.",
    ),
    restarts: Optional[int] = typer.Option(
        None, "--restarts", min=1, max=MAX_RESTARTS, rich_help_panel=opt.PANEL_ATTACK, show_default="1",
        help="ig family: random starts per victim; the lowest matching loss wins.",
    ),
    init: Optional[opt.Init] = typer.Option(None, "--init", rich_help_panel=opt.PANEL_ATTACK, show_default="randn",
                                            help="ig family: the start (rand: uniform pixels)."),
    ignore_layers: Optional[str] = typer.Option(
        None, "--ignore-layers", metavar="NAME,...", rich_help_panel=opt.PANEL_ATTACK, show_default="none",
        help="Leave these modules' gradients out of the matching loss, e.g. classifier.",
    ),
    patience: Optional[int] = typer.Option(
        None, "--patience", min=0, max=MAX_ITERATIONS, metavar="N", rich_help_panel=opt.PANEL_ATTACK,
        show_default="the preset's; precode 0, fast 100",
        help="ig family: every N iterations, stop a victim whose best matching loss improved by less than "
             "--min-improvement over the last N (0: never stop early).",
    ),
    min_improvement: Optional[float] = typer.Option(
        None, "--min-improvement", min=0.0, max=0.999, metavar="FRACTION", rich_help_panel=opt.PANEL_ATTACK,
        show_default="0.01", help="ig family: the relative improvement that --patience asks for.",
    ),
    bn_weight: Optional[float] = typer.Option(
        None, "--bn-weight", min=0.0, max=1e6, rich_help_panel=opt.PANEL_ATTACK, show_default="0.01",
        help="ig-bn: weight of the BatchNorm-statistics prior.",
    ),
    vectorize: int = typer.Option(
        16, "--vectorize", min=1, max=MAX_GROUP, rich_help_panel=opt.PANEL_RUN,
        help="ig family: attack up to this many dumps of one model at once.",
    ),
    checkpoint_every: int = typer.Option(
        500, "--checkpoint-iterations", min=0, metavar="N", rich_help_panel=opt.PANEL_RUN,
        help="ig family: save a checkpoint every N iterations (0: never).",
    ),
    resume: bool = typer.Option(
        False, "--resume", rich_help_panel=opt.PANEL_RUN,
        help="Continue an interrupted attack into the same RECON_DIR.",
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, max=1024, metavar="N", rich_help_panel=opt.PANEL_RUN, show_default="torch's: all cores",
        help="CPU threads for the attack. On a machine shared with other jobs, 1 can be many times faster.",
    ),
    shard: Optional[str] = opt.SHARD,
    model: Optional[str] = typer.Option(
        None, "--trust-builder", metavar="BUILDER", rich_help_panel=opt.PANEL_ATTACK, show_default="none",
        help="Allow importing your own package.module:builder that the dumps name (a dump alone never imports code).",
    ),
    seed: int = opt.SEED,
    out: Path = opt.out_option("RECON_DIR"),
    force: bool = opt.FORCE,
    max_memory: float = opt.MAX_MEMORY,
    config: Optional[Path] = config_option(),
) -> None:
    """Reconstruct the victims behind gradient dumps; never opens truth files.

    Reads: each DUMP from capture-gradients (a GRADS_DIR stands for its dumps; truth files are skipped).

    Writes: RECON_DIR/<dump name>.safetensors per dump (images, labels, matching loss, settings), and RECON_DIR/checkpoints/ while an ig-family attack runs. Ctrl-C saves a checkpoint; --resume continues.

    Example: precode attack grads/mlp-precode --method ig-adaptive --iterations 2000 --out recon/mlp-precode-adaptive
    """
    options = dict(locals())
    from precode_cli.stages.attack import run_attack

    run_attack(options)

"""`precode evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from precode_cli.cli_support import cli_command, config_option
from precode_cli.commands import options as opt


@cli_command
def evaluate(
    recon_dirs: List[Path] = typer.Argument(
        ..., metavar="RECON_DIR...", help="Directories from `precode attack`; several are compared side by side."
    ),
    truth: List[Path] = typer.Option(
        ..., "--truth", metavar="GRADS_DIR", rich_help_panel=opt.PANEL_SCORING,
        help="Where the truth files are; repeat for several GRADS_DIRs.",
    ),
    threshold: float = typer.Option(
        0.6, "--threshold", min=0.0, max=1.0, rich_help_panel=opt.PANEL_SCORING,
        help="SSIM at or above which an attack counts as a success.",
    ),
    space: opt.Space = typer.Option(
        "pixel", "--space", rich_help_panel=opt.PANEL_SCORING,
        help="Where SSIM is computed: [0, 1] pixels, or the PRECODE notebook's normalized space (as in the paper).",
    ),
    lpips_weights: Optional[Path] = typer.Option(
        None, "--lpips-weights", metavar="FILE", rich_help_panel=opt.PANEL_SCORING, show_default="no LPIPS",
        help="Also score LPIPS, with torchvision's AlexNet weights from this safetensors file (docs/cli.md).",
    ),
    note: Optional[str] = typer.Option(
        None, "--note", metavar="TEXT", rich_help_panel=opt.PANEL_RUN, show_default="none",
        help="A paragraph for the top of report.md.",
    ),
    out: Path = opt.out_option("REPORT_DIR"),
    force: bool = opt.FORCE,
    max_memory: float = opt.MAX_MEMORY,
    config: Optional[Path] = config_option(),
) -> None:
    """Score reconstructions against the real images and write a report.

    Reads: RECON_DIR/*.safetensors and the truth files under each --truth GRADS_DIR, paired by the hash of the dump the attack read.

    Writes: REPORT_DIR/metrics.json, metrics.csv, grid.png, ssim_hist.png and report.md, and prints a table with a row per RECON_DIR (ASR: the fraction of victims with SSIM >= --threshold; see docs/cli.md).

    Example: precode evaluate recon/mlp recon/mlp-precode --truth grads/mlp --truth grads/mlp-precode --out report
    """
    options = dict(locals())
    from precode_cli.stages.evaluate import run_evaluate

    run_evaluate(options)

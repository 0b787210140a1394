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
        ..., "--truth", metavar="GRADS_DIR", help="Where the truth files are (repeat for several GRADS_DIRs)."
    ),
    threshold: float = typer.Option(
        0.6, "--threshold", min=0.0, max=1.0, help="SSIM at or above which an attack counts as a success."
    ),
    space: str = typer.Option(
        "pixel", "--space",
        help="Where SSIM is computed: pixel ([0, 1] images) or normalized (the PRECODE notebook's convention, "
             "to compare with the paper).",
    ),
    lpips_weights: Optional[Path] = typer.Option(
        None, "--lpips-weights", metavar="FILE",
        help="Also score LPIPS, with torchvision's AlexNet weights from this local safetensors file (see docs/cli.md).",
    ),
    note: Optional[str] = typer.Option(
        None, "--note", help="A paragraph for the top of report.md, e.g. how this run differs from the paper."
    ),
    out: Path = opt.out_option("REPORT_DIR"),
    force: bool = opt.FORCE,
    max_memory: float = opt.MAX_MEMORY,
    config: Optional[Path] = config_option(),
) -> None:
    """Score reconstructions against the real images and write a report.

    Reads: RECON_DIR/*.safetensors and the truth files under each --truth GRADS_DIR, paired by the SHA-256 of the dump the attack read (not by file name).

    Writes: REPORT_DIR/metrics.json (summary, groups and per-victim figures), metrics.csv (one row per victim), grid.png (originals above reconstructions), ssim_hist.png (SSIM over victims) and report.md; prints one table, a row per RECON_DIR (model, defense, attack, ASR, mean SSIM/PSNR/MSE, label accuracy, the model's test accuracy when the dump came from a run). Metrics are in [0, 1] pixel space unless --space normalized; batches are matched to their originals by optimal assignment; ASR is the fraction of victims with SSIM >= --threshold.

    Example: precode evaluate recon/mlp recon/mlp-precode --truth grads/mlp --truth grads/mlp-precode --out report
    """
    options = dict(locals())
    from precode_cli.stages.evaluate import run_evaluate

    run_evaluate(options)

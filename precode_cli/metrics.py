"""Image similarity per victim, computed with torchmetrics, in a stated convention.

`pixel` (the default): images in [0, 1]; SSIM with an 11x11 Gaussian window (sigma 1.5, data range
1); PSNR with data range 1, capped at 100 dB (identical images would give infinity); MSE as the
mean over pixels and channels.

`normalized`: the PRECODE notebook's SSIM, so figures can be set beside the paper's: both images
in the model's normalised input space ((x - mean) / std of the dump), SSIM with the same window
and a data range of the original's max - min, and negative SSIM values clipped to 0. PSNR and
MSE stay in pixel space.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP_DB = 100.0
SPACES = ("pixel", "normalized")
CONVENTIONS = {
    "pixel": (
        "pixel space [0, 1]; SSIM: 11x11 Gaussian window, sigma 1.5, data range 1 (torchmetrics); "
        f"PSNR: data range 1, capped at {PSNR_CAP_DB:g} dB; MSE: mean over pixels and channels"
    ),
    "normalized": (
        "SSIM in the model's normalised input space as in the PRECODE notebook: 11x11 Gaussian window, sigma 1.5, "
        "data range max - min of the normalised original, negative values clipped to 0 (torchmetrics); "
        f"PSNR (data range 1, capped at {PSNR_CAP_DB:g} dB) and MSE in pixel space [0, 1]"
    ),
}
CONVENTION = CONVENTIONS["pixel"]


def ssim(reconstructions: torch.Tensor, originals: torch.Tensor, space: str = "pixel",
         data_spec: dict[str, Any] | None = None) -> torch.Tensor:
    """SSIM of each reconstruction against its original ([B, C, H, W], pixel values in [0, 1])."""
    recon = reconstructions.to(torch.float64).clamp(0, 1)
    truth = originals.to(torch.float64)
    if space == "pixel":
        return structural_similarity_index_measure(recon, truth, data_range=1.0, reduction="none").float()
    if space != "normalized":
        raise ValueError(f"unknown space {space!r}")
    if data_spec is None:
        raise ValueError("the normalized space needs the data spec's mean and std")
    from precode_cli.data import normalize

    recon_n, truth_n = normalize(recon, data_spec), normalize(truth, data_spec)
    values = []
    for r, t in zip(recon_n, truth_n):
        data_range = float((t.max() - t.min()).clamp_min(1e-12))
        values.append(structural_similarity_index_measure(r[None], t[None], data_range=data_range))
    return torch.stack(values).clamp_min(0).float()


def per_image(reconstructions: torch.Tensor, originals: torch.Tensor, space: str = "pixel",
              data_spec: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """SSIM (in `space`), PSNR and MSE (pixel space) of each reconstruction against its original."""
    recon = reconstructions.to(torch.float64).clamp(0, 1)
    truth = originals.to(torch.float64)
    mse = (recon - truth).pow(2).mean(dim=(1, 2, 3))
    psnr = peak_signal_noise_ratio(recon, truth, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = torch.nan_to_num(psnr, posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)
    return {"ssim": ssim(reconstructions, originals, space, data_spec), "psnr": psnr.float(), "mse": mse.float()}


def match_batch(reconstructions: torch.Tensor, originals: torch.Tensor) -> list[int]:
    """For each original, the reconstruction an optimal assignment pairs it with (maximum total SSIM).

    An attack on a batch returns its images in no particular order; scoring them by position would
    understate it. Pixel-space SSIM of every pair, then SciPy's Hungarian-algorithm routine.
    """
    from scipy.optimize import linear_sum_assignment

    count = originals.shape[0]
    scores = torch.stack([
        ssim(reconstructions, originals[i : i + 1].expand_as(reconstructions)) for i in range(count)
    ])  # [original, reconstruction]
    rows, cols = linear_sum_assignment(scores.numpy(), maximize=True)
    order = [0] * count
    for r, c in zip(rows, cols):
        order[int(r)] = int(c)
    return order

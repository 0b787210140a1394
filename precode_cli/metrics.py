"""Image similarity per victim, in [0, 1] pixel space, computed with torchmetrics.

Convention (stated in every report): images in [0, 1], SSIM with an 11x11 Gaussian window
(sigma 1.5, data range 1), PSNR with data range 1 capped at 100 dB (identical images would give
infinity), MSE as the mean over pixels and channels.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP_DB = 100.0
CONVENTION = (
    "pixel space [0, 1]; SSIM: 11x11 Gaussian window, sigma 1.5, data range 1 (torchmetrics); "
    f"PSNR: data range 1, capped at {PSNR_CAP_DB:g} dB; MSE: mean over pixels and channels"
)


def per_image(reconstructions: torch.Tensor, originals: torch.Tensor) -> dict[str, torch.Tensor]:
    """SSIM, PSNR and MSE of each reconstruction against its original; both [B, C, H, W] in [0, 1]."""
    recon = reconstructions.to(torch.float64).clamp(0, 1)
    truth = originals.to(torch.float64)
    ssim = structural_similarity_index_measure(recon, truth, data_range=1.0, reduction="none")
    mse = (recon - truth).pow(2).mean(dim=(1, 2, 3))
    psnr = peak_signal_noise_ratio(recon, truth, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = torch.nan_to_num(psnr, posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)
    return {"ssim": ssim.float(), "psnr": psnr.float(), "mse": mse.float()}

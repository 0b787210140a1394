"""`noise`: add Gaussian or Laplace noise to every tensor of the gradient the client shares.

Source: Zhu, Liu and Han, "Deep Leakage from Gradients" (NeurIPS 2019), section 5, which
defends against DLG by adding Gaussian or Laplacian noise to the shared gradients and shows
that the attack stops only at noise large enough to hurt accuracy. It is the simplest baseline
for the defense suite and the building block of differential-privacy style defenses.

`scale` is the Gaussian's standard deviation, or the Laplace distribution's scale b (its mean
absolute deviation; its standard deviation is sqrt(2) * b). Noise is drawn from the
`torch.Generator` the caller passes (capture seeds it with --seed), tensor by tensor in the
dict's order, so the same seed gives the same noise. Draws happen on the generator's device and
are moved to the gradient's device and dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from defenses.base import Defense, number_in
from precode_cli.errors import UserError

DISTRIBUTIONS = ("gaussian", "laplace")
DEFAULT_SCALE = 1e-2


def draw(shape: torch.Size, distribution: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Noise of `shape` (float32, on the generator's device)."""
    device = generator.device
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, device=device) * scale
    # Laplace by inverting its CDF: u ~ U(-1/2, 1/2), x = -b sign(u) log(1 - 2|u|).
    u = torch.rand(shape, generator=generator, device=device) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs()).clamp_min(-80.0)


class NoiseDefense(Defense):
    """`--defense noise`: every shared gradient tensor gets independent noise of `scale`."""

    name = "noise"
    cli_options = {"scale": "noise_scale", "distribution": "noise_distribution"}

    def __init__(self, scale: float = DEFAULT_SCALE, distribution: str = "gaussian") -> None:
        self.scale = number_in(scale, "--noise-scale", 0)
        if distribution not in DISTRIBUTIONS:
            raise UserError(f"--noise-distribution must be one of {', '.join(DISTRIBUTIONS)}, not {distribution!r}.")
        self.distribution = distribution

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale, "distribution": self.distribution}

    def perturb_gradients(self, grads: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            name: grad + draw(grad.shape, self.distribution, self.scale, generator).to(grad.device, grad.dtype)
            for name, grad in grads.items()
        }


GaussianNoise = NoiseDefense

"""LPIPS (Zhang et al., CVPR 2018) with an AlexNet backbone read from a local file, never downloaded.

torchmetrics ships LPIPS's small linear heads inside its package; only the ImageNet-trained AlexNet
backbone would come from the internet. `--lpips-weights FILE` names that backbone as a safetensors
file of torchvision's AlexNet state dict (keys `features.N.weight`/`.bias`; the classifier is
ignored), converted once on a machine with a network:

    from safetensors.torch import save_file; from torchvision.models import alexnet, AlexNet_Weights
    save_file(alexnet(weights=AlexNet_Weights.DEFAULT).state_dict(), "alexnet.safetensors")
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from precode_cli.errors import UserError

ALEXNET_CONVS = (0, 3, 6, 8, 10)  # indices of the convolutions in torchvision's AlexNet.features


def load_lpips(weights: Path) -> nn.Module:
    """The LPIPS network with the backbone from `weights`; a bad or missing file is one `UserError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torchmetrics.functional.image.lpips import _LPIPS

    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--lpips-weights {weights} does not exist; see docs/cli.md for how to make the AlexNet file.")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"--lpips-weights {weights} is not a safetensors file ({err}).") from err
    model = _LPIPS(pretrained=True, net="alex", pnet_rand=True)  # heads from torchmetrics, backbone filled below
    slices = {index: module for child in model.net.children() for name, module in child.named_children()
              for index in [int(name)]}
    for index in ALEXNET_CONVS:
        conv = slices[index]
        for part in ("weight", "bias"):
            key = f"features.{index}.{part}"
            if key not in state or state[key].shape != getattr(conv, part).shape:
                raise UserError(f"--lpips-weights {weights} is not torchvision's AlexNet: {key} is missing or has "
                                "the wrong shape.")
            with torch.no_grad():
                getattr(conv, part).copy_(state[key])
    return model.eval()


@torch.no_grad()
def lpips_distance(model: nn.Module, reconstructions: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """LPIPS per image (lower is more alike) of [B, C, H, W] images in [0, 1]; gray images count as RGB."""
    recon, truth = reconstructions.float().clamp(0, 1), originals.float()
    if recon.shape[1] == 1:
        recon, truth = recon.expand(-1, 3, -1, -1), truth.expand(-1, 3, -1, -1)
    return model(2 * recon - 1, 2 * truth - 1).flatten()

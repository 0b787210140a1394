"""torchvision's ResNet-18, adapted to small images as the gradient-inversion literature does.

For inputs up to 64 pixels the ImageNet stem (7x7 stride-2 conv and 3x3 max-pool, which would
shrink a 32-pixel image to 8 pixels before the first block) becomes one 3x3 stride-1 conv, as in
the Inverting Gradients and breaching code; larger inputs keep torchvision's stem. The first conv
takes the data's channel count. `norm` picks BatchNorm (torchvision's default) or GroupNorm with
32 groups, which has no running statistics and behaves the same in train and eval mode.
"""

from __future__ import annotations

from functools import partial

from torch import nn

NORMS = ("batch", "group")
SMALL_IMAGE_LIMIT = 64


def resnet18(input_shape: tuple[int, ...], num_classes: int, norm: str = "batch") -> nn.Module:
    """ResNet-18 for `input_shape` images; `norm` is "batch" or "group"."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, not {norm!r}")
    norm_layer = nn.BatchNorm2d if norm == "batch" else partial(nn.GroupNorm, 32)
    from torchvision.models import resnet18 as torchvision_resnet18  # imported here: torchvision is heavy to load

    model = torchvision_resnet18(weights=None, num_classes=num_classes, norm_layer=norm_layer)
    channels, height, width = input_shape
    if max(height, width) <= SMALL_IMAGE_LIMIT:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model

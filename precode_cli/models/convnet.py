"""The width-configurable ConvNet of Inverting Gradients (Geiping et al., NeurIPS 2020).

As in the authors' `inversefed` package: eight 3x3 conv-BatchNorm-ReLU blocks of widths
w, 2w, 2w, 4w, 4w, 4w | 4w, 4w with a 3x3 max-pool after the sixth and the eighth, then one
Linear layer (36w inputs for 32-pixel images). The Linear's size is found for any input size.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

WIDTH_FACTORS = (1, 2, 2, 4, 4, 4, 4, 4)
POOL_AFTER = (5, 7)  # indices of the blocks followed by MaxPool2d(3)


class ConvNet(nn.Module):
    """Inverting Gradients' ConvNet; `width` 64 is the paper's default, 8/16/32 its smaller variants."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = input_shape[0]
        for index, factor in enumerate(WIDTH_FACTORS):
            layers[f"conv{index}"] = nn.Conv2d(channels, factor * width, kernel_size=3, padding=1)
            layers[f"bn{index}"] = nn.BatchNorm2d(factor * width)
            layers[f"relu{index}"] = nn.ReLU()
            channels = factor * width
            if index in POOL_AFTER:
                layers[f"pool{POOL_AFTER.index(index)}"] = nn.MaxPool2d(3)
        layers["flatten"] = nn.Flatten()
        self.features = nn.Sequential(layers)
        with torch.no_grad():
            self.features.eval()
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
            self.features.train()
        self.classifier = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def convnet(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> nn.Module:
    """Inverting Gradients' ConvNet of the given base width."""
    return ConvNet(input_shape, num_classes, width=width)

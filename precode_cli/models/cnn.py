"""A small convolutional network: the MNIST CNN of the federated-averaging paper (McMahan et al., 2017).

The PRECODE paper's second architecture is a CNN whose exact layers are not published; this is
the most common small CNN of the federated-learning literature, so results are comparable:
conv5x5(32)-ReLU-maxpool2, conv5x5(64)-ReLU-maxpool2, Linear(512)-ReLU, Linear(classes).
Convolutions are padded ("same"), so any input size works; inputs larger than 32 pixels are
average-pooled to 8x8 before the first Linear so that its size stays bounded (a 224-pixel input
would otherwise need a 100M-parameter layer).
"""

from __future__ import annotations

import torch
from torch import nn


class CNN(nn.Module):
    """FedAvg's MNIST CNN with `width` channels in the first conv (32, the paper's, by default)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        side_h, side_w = height // 4, width_px // 4
        pooled = (min(side_h, 8), min(side_w, 8))
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(pooled),
            nn.Flatten(),
            nn.Linear(2 * width * pooled[0] * pooled[1], 512),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """FedAvg's small CNN; `width` is the first conv's channel count (the second has twice as many)."""
    return CNN(input_shape, num_classes, width=width)

"""The PRECODE paper's MLP."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Linear(in, w)-ReLU-Linear(w, w)-ReLU-Linear(w, classes), as in the PRECODE paper (w = 1024)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 1024) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int = 1024) -> nn.Module:
    """The paper's three-layer MLP; `width` is the size of both hidden layers."""
    return MLP(input_shape, num_classes, width=width)

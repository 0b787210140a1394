"""The LeNet variant of the DLG paper (Zhu et al., NeurIPS 2019).

Three 5x5 convolutions of 12 channels with sigmoid activations (strides 2, 2, 1, "same" padding)
and one Linear layer. Sigmoids make the model twice differentiable everywhere, which is why the
gradient-leakage literature attacks it. Weights and biases are drawn uniformly from [-0.5, 0.5],
as DLG's code does; PyTorch's default initialisation gives gradients too small to attack well.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """DLG's LeNet: (conv5x5(12)-sigmoid) x 3, then Linear(classes)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        out_h, out_w = _halve(_halve(height)), _halve(_halve(width))
        self.features = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(12 * out_h * out_w, num_classes)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _halve(size: int) -> int:
    """Output size of a stride-2, padding-2, 5x5 convolution."""
    return (size - 1) // 2 + 1


def lenet(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """DLG's LeNet (no width to choose: 12 channels throughout)."""
    return LeNet(input_shape, num_classes)

"""What every dataset loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSet:
    """Images (float32 [N, C, H, W] in [0, 1]) and labels (int64 [N]) of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def from_uint8(images: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> ImageSet:
    """An ImageSet from uint8 pixels [N, C, H, W] and integer labels."""
    return ImageSet(images.to(torch.float32).div_(255.0), labels.to(torch.int64), list(class_names))

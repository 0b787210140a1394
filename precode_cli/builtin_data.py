"""The built-in dataset: ten classes of coloured shapes and textures, generated from a seed.

It needs no download, so the quick start and the tests run anywhere. The classes differ in
shape, colour and texture, so a person can tell from a reconstruction whether an attack worked;
position, size, colours, stripe frequency and noise vary per image, so a classifier has
something to learn. The same split and index always give the same image.
"""

from __future__ import annotations

import math

import torch

CLASS_NAMES = [
    "red-disc",
    "green-square",
    "blue-triangle",
    "yellow-cross",
    "cyan-ring",
    "magenta-h-stripes",
    "orange-v-stripes",
    "white-checkerboard",
    "purple-diagonals",
    "grey-dots",
]
# Foreground colour of each class (RGB in [0, 1]); each image jitters it.
CLASS_COLOURS = torch.tensor(
    [
        [0.90, 0.15, 0.10],
        [0.15, 0.80, 0.20],
        [0.15, 0.30, 0.95],
        [0.95, 0.90, 0.10],
        [0.10, 0.85, 0.90],
        [0.90, 0.15, 0.85],
        [1.00, 0.55, 0.05],
        [0.95, 0.95, 0.95],
        [0.55, 0.20, 0.80],
        [0.60, 0.60, 0.60],
    ]
)
SPLIT_SIZES = {"train": 10_000, "test": 2_000}
SPLIT_SEEDS = {"train": 0, "test": 1}
IMAGE_SIZE = 32


def generate(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (float32 [N, 3, 32, 32] in [0, 1], on the 8-bit grid) and labels (int64 [N]) of a split."""
    n = SPLIT_SIZES[split]
    gen = torch.Generator().manual_seed(SPLIT_SEEDS[split])
    labels = (torch.arange(n) % len(CLASS_NAMES))[torch.randperm(n, generator=gen)]
    images = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    for cls in range(len(CLASS_NAMES)):
        idx = (labels == cls).nonzero().flatten()
        images[idx] = _draw_class(cls, len(idx), gen)
    return (images * 255).round().div(255), labels


def _draw_class(cls: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` images of one class: a foreground mask blended over a random dark background."""

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=gen)

    coords = (torch.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE
    y = coords.view(1, -1, 1)
    x = coords.view(1, 1, -1)
    cx, cy = uniform(0.35, 0.65, 1, 1), uniform(0.35, 0.65, 1, 1)
    r = uniform(0.18, 0.30, 1, 1)
    dx, dy = x - cx, y - cy
    dist = (dx**2 + dy**2).sqrt()
    freq, phase = uniform(2.5, 4.5, 1, 1), uniform(0, 2 * math.pi, 1, 1)

    if cls == 0:
        mask = dist < r
    elif cls == 1:
        mask = (dx.abs() < r * 0.85) & (dy.abs() < r * 0.85)
    elif cls == 2:
        mask = (dy < r * 0.8) & (dy > -r) & (dx.abs() < (dy + r) * 0.6)
    elif cls == 3:
        arm = r / 3
        mask = ((dx.abs() < arm) & (dy.abs() < r)) | ((dy.abs() < arm) & (dx.abs() < r))
    elif cls == 4:
        mask = (dist < r) & (dist > r * 0.55)
    elif cls == 5:
        mask = torch.sin(2 * math.pi * freq * y + phase) > 0
    elif cls == 6:
        mask = torch.sin(2 * math.pi * freq * x + phase) > 0
    elif cls == 7:
        cells = torch.floor(uniform(3, 6, 1, 1))
        mask = ((torch.floor(x * cells) + torch.floor(y * cells)) % 2) == 0
    elif cls == 8:
        mask = torch.sin(2 * math.pi * freq * (x + y) / math.sqrt(2) + phase) > 0
    else:
        spacing = 1 / torch.floor(uniform(3, 5, 1, 1))
        near_x = (x % spacing) - spacing / 2
        near_y = (y % spacing) - spacing / 2
        mask = (near_x**2 + near_y**2).sqrt() < spacing * 0.3
    mask = mask.expand(n, IMAGE_SIZE, IMAGE_SIZE).unsqueeze(1).float()

    foreground = (CLASS_COLOURS[cls].view(1, 3, 1, 1) + uniform(-0.08, 0.08, 3, 1, 1)).clamp(0, 1)
    background = uniform(0.0, 0.35, 3, 1, 1)
    noise = 0.03 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return (mask * foreground + (1 - mask) * background + noise).clamp(0, 1)

"""A safetensors file of images and labels: the handiest way to pass prepared data by path.

Tensors `images` (uint8 [N, C, H, W] in 0..255, or float in [0, 1]) and `labels` (integer [N]);
optional metadata `classes`, comma-separated class names. Read with safetensors, so the file can
hold nothing but tensors. The whole file is one pool that `precode_cli.data` splits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from precode_cli import budget
from precode_cli.datasets.parts import ImageSet
from precode_cli.errors import UserError
from precode_cli.limits import MAX_CLASSES


def load(path: Path) -> dict[str, ImageSet]:
    """{"all": the file's images and labels}."""
    if not path.is_file():
        raise UserError(f"--data-dir {path} is not a file; --dataset tensors takes a .safetensors file of images and labels.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            if not {"images", "labels"} <= names:
                raise UserError(f"{path} needs tensors 'images' and 'labels'; it has {sorted(names)}.")
            shape = handle.get_slice("images").get_shape()
            if len(shape) == 4 and all(0 <= side <= 2**31 for side in shape):  # as float32, before it is loaded
                budget.require(f"loading {path} ({shape[0]:,} images of {shape[1:]})", 2 * 4 * math.prod(shape))
            images, labels = handle.get_tensor("images"), handle.get_tensor("labels")
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}).") from err
    if images.dim() != 4 or images.shape[1] not in (1, 3) or labels.dim() != 1 or len(labels) != len(images):
        raise UserError(f"{path}: images must be [N, 1 or 3, H, W] with labels [N]; got {list(images.shape)} "
                        f"and {list(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or (len(labels) and int(labels.min()) < 0):
        raise UserError(f"{path}: labels must be non-negative integers.")
    if images.dtype == torch.uint8:
        pixels = images.to(torch.float32) / 255.0
    elif images.dtype.is_floating_point and bool(torch.isfinite(images).all()) and images.min() >= 0 and images.max() <= 1:
        pixels = images.to(torch.float32)
    else:
        raise UserError(f"{path}: images must be uint8 (0..255) or floats in [0, 1], not {images.dtype} outside that.")
    labels = labels.to(torch.int64)
    count = int(labels.max()) + 1 if len(labels) else 0
    if count > MAX_CLASSES:
        raise UserError(f"{path} has label {count - 1}; precode takes at most {MAX_CLASSES:,} classes.")
    classes = [c for c in meta.get("classes", "").split(",") if c] or [str(i) for i in range(count)]
    if len(classes) < count:
        raise UserError(f"{path} names {len(classes)} classes in its metadata but has label {count - 1}.")
    return {"all": ImageSet(pixels, labels, classes)}

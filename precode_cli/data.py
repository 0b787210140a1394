"""Datasets by name: images in [0, 1] pixel space plus the statistics that normalise them.

Every loader returns an `ImageSet` held in memory. The `data` spec recorded in every file says
where the images came from and how the model's inputs were normalised: input = (image - mean) / std,
per channel, with published statistics for the torchvision datasets and statistics computed on the
training split otherwise. Splits are deterministic: a dataset without its own test split is split
80/20 by a fixed permutation, and `--subset N` takes the first N of another fixed permutation.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from precode_cli import budget, builtin_data
from precode_cli.datasets.parts import ImageSet
from precode_cli.errors import UserError

__all__ = ["ImageSet", "DATASETS", "SPLITS", "load", "data_spec", "normalize", "denormalize", "subset", "source_of"]

DATASETS = ("builtin", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "tensors")
NEEDS_DATA_DIR = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder", "tensors")
SPLITS = ("train", "test", "all")
POOL_TEST_FRACTION = 0.2
SPLIT_SEED, SUBSET_SEED = 0, 1
# Published per-channel statistics (mean, std) of each torchvision dataset's training split.
PUBLISHED_STATS = {
    "cifar10": ((0.4914672374725342, 0.4822617471218109, 0.4467701315879822),
                (0.24703224003314972, 0.24348513782024384, 0.26158785820007324)),
    "cifar100": ((0.5071598291397095, 0.4866936206817627, 0.44120192527770996),
                 (0.2673342823982239, 0.2564384639263153, 0.2761504650115967)),
    "mnist": ((0.13066373765468597,), (0.30810782313346863,)),
    "fashion-mnist": ((0.28604060411453247,), (0.3530242443084717,)),
}
IMAGE_SIZES = (8, 512)


def load(
    dataset: str,
    split: str,
    data_dir: Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    download: bool = False,
) -> ImageSet:
    """Load one split of a dataset by its --dataset name, resized and converted as asked."""
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; choose one of: {', '.join(SPLITS)}.")
    parts = _parts(dataset, Path(data_dir).resolve() if data_dir else None, image_size, channels, download)
    if split == "all":
        if "all" in parts:
            return parts["all"]
        train, test = parts["train"], parts["test"]
        return ImageSet(torch.cat([train.images, test.images]), torch.cat([train.labels, test.labels]), train.class_names)
    if split in parts:
        return parts[split]
    whole = parts["all"]
    order = torch.randperm(len(whole), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(len(whole) * POOL_TEST_FRACTION))
    chosen = (order[:n_test] if split == "test" else order[n_test:]).sort().values
    return ImageSet(whole.images[chosen], whole.labels[chosen], whole.class_names)


def subset(images: ImageSet, n: int | None) -> ImageSet:
    """The first `n` images of a fixed permutation (all of them when n is None or too large)."""
    if n is None or n >= len(images):
        return images
    if n < 1:
        raise UserError(f"--subset must be at least 1, not {n}.")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n].sort().values
    return ImageSet(images.images[chosen], images.labels[chosen], images.class_names)


def data_spec(
    dataset: str,
    data_dir: Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    download: bool = False,
) -> dict[str, Any]:
    """What every file records about the data: where from, normalisation, input shape, classes."""
    train = load(dataset, "train", data_dir, image_size, channels, download)
    shape = list(train.images.shape[1:])
    published = PUBLISHED_STATS.get(dataset)
    if published is not None and len(published[0]) == shape[0]:
        mean, std, stats = list(published[0]), list(published[1]), "published"
    else:
        mean = [round(v, 6) for v in train.images.mean(dim=(0, 2, 3)).tolist()]
        std = [round(v, 6) for v in train.images.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()]
        stats = "training split"
    return {
        "dataset": dataset,
        "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
        "image_size": image_size,
        "channels": channels,
        "mean": mean,
        "std": std,
        "stats": stats,
        "input_shape": shape,
        "num_classes": len(train.class_names),
        "class_names": train.class_names,
    }


def with_published_stats(spec: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The spec normalised with another dataset's published statistics (--stats), e.g. CIFAR-10's for its images."""
    if name is None:
        return spec
    if name not in PUBLISHED_STATS:
        raise UserError(f"unknown --stats {name!r}; choose one of: {', '.join(PUBLISHED_STATS)}.")
    mean, std = PUBLISHED_STATS[name]
    if len(mean) != spec["input_shape"][0]:
        raise UserError(f"--stats {name} is for {len(mean)}-channel images, but these have {spec['input_shape'][0]}.")
    return {**spec, "mean": list(mean), "std": list(std), "stats": f"published ({name})"}


def source_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `load` that reproduce the images a data spec was made from."""
    return {key: spec.get(key) for key in ("data_dir", "image_size", "channels")}


def normalize(images: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """Pixel-space images in [0, 1] to the model's input space."""
    mean, std = _stats(spec, images)
    return (images - mean) / std


def denormalize(inputs: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """The model's input space back to pixel space (not clamped)."""
    mean, std = _stats(spec, inputs)
    return inputs * std + mean


def _stats(spec: dict[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(spec["mean"], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return mean, std


@lru_cache(maxsize=4)
def _parts(
    dataset: str, data_dir: Path | None, image_size: int | None, channels: int | None, download: bool
) -> dict[str, ImageSet]:
    """Every split a dataset has on disk, resized and converted: {"train", "test"} or {"all"}."""
    if dataset not in DATASETS:
        raise UserError(f"unknown --dataset {dataset!r}; choose one of: {', '.join(DATASETS)}.")
    if image_size is not None and not IMAGE_SIZES[0] <= image_size <= IMAGE_SIZES[1]:
        raise UserError(f"--image-size must be between {IMAGE_SIZES[0]} and {IMAGE_SIZES[1]}, not {image_size}.")
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3, not {channels}.")
    if dataset == "builtin":
        if data_dir is not None:
            raise UserError("--dataset builtin is generated, not read: drop --data-dir (or name the dataset it holds).")
        parts = {split: ImageSet(*builtin_data.generate(split), list(builtin_data.CLASS_NAMES)) for split in ("train", "test")}
    elif data_dir is None:
        hint = "a folder with one sub-folder per class" if dataset == "imagefolder" else (
            "a .safetensors file of images and labels" if dataset == "tensors" else "a folder for the files; add --download to fetch them")
        raise UserError(f"--dataset {dataset} needs --data-dir ({hint}).")
    elif dataset == "imagefolder":
        from precode_cli.datasets import imagefolder

        return imagefolder.load(data_dir, image_size, channels)
    elif dataset == "tensors":
        from precode_cli.datasets import tensors

        parts = tensors.load(data_dir)
    elif dataset in ("cifar10", "cifar100"):
        from precode_cli.datasets import cifar

        parts = cifar.load(dataset, data_dir, download)
    else:
        from precode_cli.datasets import idx

        parts = idx.load(dataset, data_dir, download)
    size = sum(len(part) * (channels or part.images.shape[1]) for part in parts.values())
    side = image_size or max(part.images.shape[-1] for part in parts.values())
    budget.require(f"loading {dataset} at {side}x{side} pixels ({sum(len(p) for p in parts.values()):,} images)",
                   4 * size * side * side, "choose a smaller --image-size")
    return {split: _reshape(images, image_size, channels) for split, images in parts.items()}


def _reshape(images: ImageSet, image_size: int | None, channels: int | None) -> ImageSet:
    """Resize to `image_size` squares (antialiased) and convert to `channels` (ITU-R 601 luma for gray)."""
    pixels = images.images
    if channels is not None and channels != pixels.shape[1]:
        if channels == 3:
            pixels = pixels.expand(-1, 3, -1, -1).contiguous()
        else:
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            pixels = (pixels * luma).sum(dim=1, keepdim=True)
    if image_size is not None and tuple(pixels.shape[2:]) != (image_size, image_size):
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False).clamp_(0, 1)
    return ImageSet(pixels, images.labels, images.class_names)

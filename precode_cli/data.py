"""Datasets by name: images in [0, 1] pixel space plus the statistics that normalise them.

Every loader returns an `ImageSet` held in memory (the victim sets and the small training sets
this tool works with fit easily). The `data` spec recorded in every file says how the model's
inputs were normalised: input = (image - mean) / std, per channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from precode_cli import builtin_data
from precode_cli.errors import UserError

DATASETS = ("builtin", "imagefolder")
SPLITS = ("train", "test", "all")
IMAGEFOLDER_TEST_FRACTION = 0.2


@dataclass
class ImageSet:
    """Images (float32 [N, C, H, W] in [0, 1]) and labels (int64 [N]) of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def load(dataset: str, split: str, data_dir: Path | None = None, image_size: int = 32) -> ImageSet:
    """Load one split of a dataset by its --dataset name."""
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; choose one of: {', '.join(SPLITS)}.")
    if dataset == "builtin":
        return _builtin(split)
    if dataset == "imagefolder":
        if data_dir is None:
            raise UserError("--dataset imagefolder needs --data-dir DIR (a folder with one sub-folder per class).")
        return _imagefolder(Path(data_dir), split, image_size)
    raise UserError(f"unknown --dataset {dataset!r}; choose one of: {', '.join(DATASETS)}.")


def data_spec(dataset: str, data_dir: Path | None = None, image_size: int = 32) -> dict[str, Any]:
    """What every file records about the data: name, normalisation, input shape, classes."""
    train = load(dataset, "train", data_dir, image_size)
    mean = train.images.mean(dim=(0, 2, 3))
    std = train.images.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return {
        "dataset": dataset,
        "data_dir": str(data_dir) if data_dir is not None else None,
        "mean": [round(v, 6) for v in mean.tolist()],
        "std": [round(v, 6) for v in std.tolist()],
        "input_shape": list(train.images.shape[1:]),
        "num_classes": len(train.class_names),
        "class_names": train.class_names,
    }


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
def _builtin_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return builtin_data.generate(split)


def _builtin(split: str) -> ImageSet:
    if split == "all":
        parts = [_builtin_split(s) for s in ("train", "test")]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    else:
        images, labels = _builtin_split(split)
    return ImageSet(images, labels, list(builtin_data.CLASS_NAMES))


@lru_cache(maxsize=4)
def _imagefolder_all(root: Path, image_size: int) -> ImageSet:
    from torchvision import datasets, transforms

    if not root.is_dir():
        raise UserError(f"--data-dir {root} is not a directory; give a folder with one sub-folder per class.")
    transform = transforms.Compose(
        [
            transforms.Lambda(lambda img: img.convert("RGB")),
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
        ]
    )
    try:
        folder = datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"--data-dir {root} holds no class sub-folders with images ({err}).") from err
    images, labels = [], []
    for i in range(len(folder)):
        try:
            image, label = folder[i]
        except OSError as err:
            raise UserError(f"{folder.samples[i][0]} is not a readable image ({err}); remove or replace it.") from err
        images.append(image)
        labels.append(label)
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(folder.classes))


def _with_classes_of(part: ImageSet, class_names: list[str], where: Path) -> ImageSet:
    """Relabel `part` by the training split's class list (ImageFolder numbers each folder's classes anew)."""
    unknown = [name for name in part.class_names if name not in class_names]
    if unknown:
        raise UserError(f"{where} has class folders {unknown} that the train folder lacks; both need the same classes.")
    mapping = torch.tensor([class_names.index(name) for name in part.class_names], dtype=torch.int64)
    return ImageSet(part.images, mapping[part.labels], list(class_names))


def _imagefolder(root: Path, split: str, image_size: int) -> ImageSet:
    """Class folders under DIR/train and DIR/test when both exist; otherwise a fixed 80/20 split of DIR."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = _imagefolder_all(root / "train", image_size)
        if split == "train":
            return train
        test = _with_classes_of(_imagefolder_all(root / "test", image_size), train.class_names, root / "test")
        if split == "test":
            return test
        return ImageSet(torch.cat([train.images, test.images]), torch.cat([train.labels, test.labels]), train.class_names)
    whole = _imagefolder_all(root, image_size)
    if split == "all":
        return whole
    order = torch.randperm(len(whole), generator=torch.Generator().manual_seed(0))
    n_test = int(round(len(whole) * IMAGEFOLDER_TEST_FRACTION))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    chosen = chosen.sort().values
    return ImageSet(whole.images[chosen], whole.labels[chosen], whole.class_names)

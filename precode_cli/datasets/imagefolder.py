"""A folder with one sub-folder of images per class (torchvision's ImageFolder layout).

This is how Medical MNIST and most users' own data sets come. Images are resized to
`image_size` squares; they load as one channel when every image is grayscale, as three otherwise
(or as `channels` says). Class folders under DIR/train and DIR/test give the splits; without them
the whole folder is one pool that `precode_cli.data` splits.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from precode_cli.datasets.parts import ImageSet
from precode_cli.errors import UserError

DEFAULT_IMAGE_SIZE = 32
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def load(root: Path, image_size: int | None, channels: int | None) -> dict[str, ImageSet]:
    """{"train", "test"} from DIR/train and DIR/test when both exist, else {"all"} from DIR."""
    size = image_size or DEFAULT_IMAGE_SIZE
    if not root.is_dir():
        raise UserError(f"--data-dir {root} is not a directory; give a folder with one sub-folder per class.")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = _load_folder(root / "train", size, channels)
        test = _load_folder(root / "test", size, channels or train.images.shape[1])  # the train split decides
        return {"train": train, "test": _with_classes_of(test, train.class_names, root / "test")}
    return {"all": _load_folder(root, size, channels)}


@lru_cache(maxsize=4)
def _load_folder(root: Path, image_size: int, channels: int | None) -> ImageSet:
    from PIL import Image
    from torchvision import datasets
    from torchvision.transforms import functional as TF

    try:
        folder = datasets.ImageFolder(str(root), loader=lambda path: path)  # paths only: we open them ourselves
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"--data-dir {root} holds no class sub-folders with images ({err}).") from err
    images, labels = [], []
    for path, label in folder.samples:
        try:
            with Image.open(path) as image:
                mode = _mode(image.mode, channels)
                pixels = image.convert(mode).resize((image_size, image_size), Image.BILINEAR)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UserError(f"{path} is not a readable image ({err}); remove or replace it.") from err
        images.append(TF.to_tensor(pixels))
        labels.append(label)
    if any(image.shape[0] == 3 for image in images):  # a mixed folder: grayscale images become colour
        images = [image.expand(3, -1, -1) for image in images]
    labels = torch.tensor(labels, dtype=torch.int64)
    return ImageSet(torch.stack(images), labels, list(folder.classes))


def _mode(image_mode: str, channels: int | None) -> str:
    """PIL mode to load an image in: as asked, else grayscale images as L and all others as RGB."""
    if channels is not None:
        return "L" if channels == 1 else "RGB"
    return "L" if image_mode in GRAYSCALE_MODES else "RGB"


def _with_classes_of(part: ImageSet, class_names: list[str], where: Path) -> ImageSet:
    """Relabel `part` by the training split's class list (ImageFolder numbers each folder's classes anew)."""
    unknown = [name for name in part.class_names if name not in class_names]
    if unknown:
        raise UserError(f"{where} has class folders {unknown} that the train folder lacks; both need the same classes.")
    mapping = torch.tensor([class_names.index(name) for name in part.class_names], dtype=torch.int64)
    return ImageSet(part.images, mapping[part.labels], list(class_names))

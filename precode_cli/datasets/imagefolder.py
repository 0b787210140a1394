"""A folder with one sub-folder of images per class (torchvision's ImageFolder layout).

This is how Medical MNIST and most users' own data sets come. Images are resized to
`image_size` squares; they load as one channel when every image is grayscale, as three otherwise
(or as `channels` says). Class folders under DIR/train and DIR/test give the splits; without them
the whole folder is one pool that `precode_cli.data` splits.

The folder is someone else's, so it is walked by our own bounded walk (`find_images`), not by
torchvision's ImageFolder: classes and images come in ImageFolder's order (sorted class names, then
sorted folders and file names) with the same labels, but
- a class folder may be a symlink to a directory, which is followed once; inside a class folder,
  symlinks to directories are never followed, so a symlink loop cannot make the walk loop;
- only files with an image extension that are regular files (or symlinks to regular files) are
  opened. A FIFO, socket or device named like an image, or a symlink to one, is refused by name
  and never opened (opening a FIFO would wait forever; reading /dev/zero would never end);
- at most MAX_CLASSES classes, MAX_IMAGES images and MAX_ENTRIES directory entries are walked, and
  an image file over MAX_IMAGE_BYTES is refused before it is opened.
"""

from __future__ import annotations

import io
import os
import stat
from functools import lru_cache
from pathlib import Path

import torch

from precode_cli.datasets.parts import ImageSet
from precode_cli.errors import UserError

DEFAULT_IMAGE_SIZE = 32
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
# torchvision's IMG_EXTENSIONS, matched case-insensitively as ImageFolder does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_CLASSES = 10_000
MAX_IMAGES = 1_000_000
MAX_ENTRIES = 5_000_000  # directory entries walked, images or not
MAX_IMAGE_BYTES = 100 * 2**20  # 100 MiB per image file
_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symlink"}


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
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    classes, samples = find_images(root)
    images, labels = [], []
    for path, label in samples:
        data = _read_image_file(path)
        try:
            with Image.open(io.BytesIO(data)) as image:
                mode = _mode(image.mode, channels)
                pixels = image.convert(mode).resize((image_size, image_size), Image.BILINEAR)
        except UnidentifiedImageError as err:
            raise UserError(f"{path} is not a readable image (Pillow does not know its format); "
                            "remove or replace it.") from err
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UserError(f"{path} is not a readable image ({_short(err)}); remove or replace it.") from err
        images.append(TF.to_tensor(pixels))
        labels.append(label)
    if any(image.shape[0] == 3 for image in images):  # a mixed folder: grayscale images become colour
        images = [image.expand(3, -1, -1) for image in images]
    labels = torch.tensor(labels, dtype=torch.int64)
    return ImageSet(torch.stack(images), labels, classes)


def find_images(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, [(image path, label)]) in torchvision ImageFolder's order, walked safely.

    Class folders are root's sub-directories (a symlink to a directory counts, followed this once).
    Each is walked with `os.walk(followlinks=False)`: symlinked directories inside it are never
    entered. Files are kept by extension only here; `_read_image_file` checks each is regular.
    """
    entries = 0
    try:
        classes = []
        with os.scandir(root) as found:
            for entry in found:
                entries += 1
                if entries > MAX_ENTRIES:
                    raise UserError(f"--data-dir {root} holds over {MAX_ENTRIES:,} entries; precode walks at most "
                                    "that many.")
                if _is_directory(entry):
                    classes.append(entry.name)
    except OSError as err:
        raise UserError(f"--data-dir {root} cannot be read ({err.strerror or err}).") from err
    if not classes:
        raise UserError(f"--data-dir {root} holds no class sub-folders; give a folder with one sub-folder of "
                        "images per class.")
    if len(classes) > MAX_CLASSES:
        raise UserError(f"--data-dir {root} has {len(classes):,} class folders; precode takes at most "
                        f"{MAX_CLASSES:,}.")
    classes.sort()
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        walked = []
        for folder, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=False):
            entries += len(dirnames) + len(filenames)
            if entries > MAX_ENTRIES:
                raise UserError(f"--data-dir {root} holds over {MAX_ENTRIES:,} entries; precode walks at most "
                                "that many.")
            walked.append((folder, filenames))
        before = len(samples)
        for folder, filenames in sorted(walked):  # ImageFolder's order: folders by path, then file names
            for filename in sorted(filenames):
                if filename.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(folder, filename), label))
            if len(samples) > MAX_IMAGES:
                raise UserError(f"--data-dir {root} holds over {MAX_IMAGES:,} images; precode reads at most "
                                "that many.")
        if len(samples) == before:
            empty.append(name)
    if empty:
        shown = ", ".join(_clip(name) for name in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise UserError(f"--data-dir {root}: the class folder(s) {shown} hold no images "
                        f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folders.")
    return classes, samples


def _is_directory(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlink to a class folder, once
    except OSError:
        return False


def _read_image_file(path: str) -> bytes:
    """The bytes of a regular file of at most MAX_IMAGE_BYTES; nothing else is ever opened."""
    try:
        info = os.stat(path)  # through a symlink to its target: the target must be a regular file too
        if not stat.S_ISREG(info.st_mode):
            kind = _KIND.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise UserError(f"{path} is {kind}, not an image file; precode opens only regular files, "
                            "so remove it from the folder.")
        if info.st_size > MAX_IMAGE_BYTES:
            raise UserError(f"{path} has {info.st_size:,} bytes; precode reads image files of at most "
                            f"{MAX_IMAGE_BYTES:,} bytes.")
        # O_NONBLOCK: should the file be swapped for a FIFO since the check, opening it still returns.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise UserError(f"{path} changed into something other than a regular file while being read; "
                                "remove it from the folder.")
            data = file.read(MAX_IMAGE_BYTES + 1)
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}); remove or replace it.") from err
    if len(data) > MAX_IMAGE_BYTES:
        raise UserError(f"{path} has over {MAX_IMAGE_BYTES:,} bytes; precode reads image files of at most "
                        f"{MAX_IMAGE_BYTES:,} bytes.")
    return data


def _clip(text: str, limit: int = 60) -> str:
    """`repr(text)`, shortened: names from the folder must not flood a one-line message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _short(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


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

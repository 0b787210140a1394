"""MNIST and Fashion-MNIST in their own IDX files, read without torchvision's dataset classes.

Reading the four IDX files ourselves lets --data-dir point at the files wherever they are (the
folder itself, DIR/raw, or torchvision's DIR/MNIST/raw), plain or gzipped, and validates every
header before it trusts a size. `--download` uses torchvision's downloader and mirrors.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import torch

from precode_cli import budget
from precode_cli.datasets.parts import ImageSet, from_uint8
from precode_cli.errors import UserError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion-mnist": ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"],
}
UINT8_CODE = 0x08


def load(name: str, root: Path, download: bool) -> dict[str, ImageSet]:
    """Both splits of `name` ("mnist" or "fashion-mnist") from `root`."""
    if download:
        _download(name, root)
    folder = _find_folder(name, root)
    parts = {}
    for split, (image_file, label_file) in FILES.items():
        images = read_idx(_existing(folder, image_file))
        labels = read_idx(_existing(folder, label_file))
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise UserError(f"{folder}: {image_file} and {label_file} do not hold matching images [N, H, W] and labels [N].")
        if len(labels) and int(labels.max()) >= len(CLASS_NAMES[name]):
            raise UserError(f"{folder}/{label_file} has label {int(labels.max())}, but {name} has "
                            f"{len(CLASS_NAMES[name])} classes; download it again.")
        parts[split] = from_uint8(images.unsqueeze(1), labels, CLASS_NAMES[name])
    return parts


def _gunzip_bounded(path: Path, raw: bytes, limit: int) -> bytes:
    """Decompress a .gz file, refusing it as soon as it would expand past the memory limit (a gzip bomb)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = inflater.decompress(raw, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        budget.require(f"decompressing {path}", limit + 1)
    if not inflater.eof:
        raise EOFError("the compressed data ends early")
    return out


def read_idx(path: Path) -> torch.Tensor:
    """One IDX file (plain or .gz) of unsigned bytes as a uint8 tensor, header checked against the size."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = _gunzip_bounded(path, raw, budget.max_memory())
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise UserError(f"{path} cannot be read ({err}); download it again.") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != UINT8_CODE or not 1 <= raw[3] <= 4:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; download it again.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated; download it again.")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != math.prod(shape):
        raise UserError(f"{path} holds {len(raw) - header} bytes of data but its header says {shape}; download it again.")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _find_folder(name: str, root: Path) -> Path:
    candidates = [root, root / "raw", root / TORCHVISION_FOLDERS[name] / "raw"]
    for folder in candidates:
        if (folder / FILES["train"][0]).exists() or (folder / (FILES["train"][0] + ".gz")).exists():
            return folder
    raise UserError(f"no {name} IDX files ({FILES['train'][0]}[.gz] and the other three) in {root}, {root}/raw or "
                    f"{root}/{TORCHVISION_FOLDERS[name]}/raw; pass --download to fetch them.")


def _existing(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise UserError(f"{folder} lacks {stem} (or {stem}.gz); download the dataset again.")


def _download(name: str, root: Path) -> None:
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except (OSError, RuntimeError) as err:
        raise UserError(f"downloading {name} into {root} failed ({err}); check the network or put the files there.") from err

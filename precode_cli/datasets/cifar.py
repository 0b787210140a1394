"""CIFAR-10 and CIFAR-100 in their official "python version" layout, read without running code.

The official files are Python pickles. A pickle can name any function to call while loading, so
we never hand one to `pickle.load`: `SafeUnpickler` resolves only the handful of names that
rebuild plain bytes and numpy uint8 arrays, and refuses a file that names anything else before
calling it. `--download` fetches the archive with torchvision's downloader and checksum.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from precode_cli.datasets.parts import ImageSet, from_uint8
from precode_cli.errors import UserError

# (module, name) pairs a CIFAR batch may reference: numpy's array and dtype reconstruction and the
# latin-1 decoding of Python 2 strings. None of them runs code named by the file.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
    },
}
MAX_BATCH_BYTES = 400_000_000


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can build only containers, strings, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def safe_load(path: Path) -> Any:
    """Load one CIFAR batch file through `SafeUnpickler`; any problem is one `UserError`."""
    try:
        if path.stat().st_size > MAX_BATCH_BYTES:
            raise UserError(f"{path} is too large to be a CIFAR batch file.")
        raw = path.read_bytes()
        return SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except UserError:
        raise
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err}).") from err
    except Exception as err:  # any malformed or hostile pickle: refused, never executed
        raise UserError(f"{path} is not a CIFAR batch file that precode can read safely ({err}).") from err


def load(name: str, root: Path, download: bool) -> dict[str, ImageSet]:
    """Both splits of `name` ("cifar10" or "cifar100") from `root` or `root/<official folder>`."""
    layout = LAYOUTS[name]
    if download:
        _download(name, root)
    folder = root if (root / layout["test"][0]).exists() else root / layout["folder"]
    if not (folder / layout["test"][0]).exists():
        raise UserError(f"no {name} files in {root} (looked for {layout['folder']}/{layout['test'][0]}); "
                        "pass --download to fetch them.")
    meta_file, meta_key = layout["meta"]
    class_names = [str(n) for n in _field(safe_load(folder / meta_file), meta_key, folder / meta_file)]
    parts = {}
    for split in ("train", "test"):
        images, labels = [], []
        for batch_name in layout[split]:
            path = folder / batch_name
            if not path.exists():
                raise UserError(f"{folder} lacks {batch_name}; download {name} again.")
            batch = safe_load(path)
            pixels = torch.as_tensor(_field(batch, "data", path))
            batch_labels = torch.as_tensor(list(_field(batch, layout["labels"], path)), dtype=torch.int64)
            if pixels.dtype != torch.uint8 or pixels.dim() != 2 or pixels.shape[1] != 3 * 32 * 32 \
                    or len(pixels) != len(batch_labels):
                raise UserError(f"{path} does not hold uint8 images [N, 3072] with one label each.")
            if len(batch_labels) and not 0 <= int(batch_labels.min()) <= int(batch_labels.max()) < len(class_names):
                raise UserError(f"{path} has labels outside 0..{len(class_names) - 1}.")
            images.append(pixels.reshape(-1, 3, 32, 32))
            labels.append(batch_labels)
        parts[split] = from_uint8(torch.cat(images), torch.cat(labels), class_names)
    return parts


def _field(batch: Any, key: str, path: Path) -> Any:
    """`batch[key]`, accepting the bytes keys of files pickled without an encoding."""
    if isinstance(batch, dict):
        for candidate in (key, key.encode()):
            if candidate in batch:
                value = batch[candidate]
                if isinstance(value, list):
                    return [v.decode() if isinstance(v, bytes) else v for v in value]
                return value
    raise UserError(f"{path} has no {key!r} entry; is it a {path.parent.name} file?")


def _download(name: str, root: Path) -> None:
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:  # the class's own URL and checksum; we never instantiate it, as its loader unpickles
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except (OSError, RuntimeError) as err:
        raise UserError(f"downloading {name} into {root} failed ({err}); check the network or put the files there.") from err

"""The precode file format, version 1: safetensors tensors plus JSON metadata, never pickle.

Six kinds of file connect the stages (see docs/file-format.md for the full specification):

    model            precode train              weights of a trained model (also every epoch checkpoint)
    training-state   precode train              what `--resume` needs: weights, optimiser, random state
    gradients        precode capture-gradients  what one client shares for one batch (attacker's view)
    truth            precode capture-gradients  the batch's real images and labels (evaluation only)
    reconstruction   precode attack             what an attack recovered from one gradient dump
    attack-state     precode attack             what `--resume` needs to continue an interrupted attack

Every file carries the metadata keys `format` (e.g. "precode-gradients") and `format_version`
("1") as plain strings; every other metadata value is a JSON document. Readers check format and
version before they look at anything else, and refuse what they do not understand.
"""

from __future__ import annotations

import hashlib
import re
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from precode_cli.atomic import atomic_path
from precode_cli.errors import UserError

FORMAT_VERSION = 1
FORMAT_NAMES = {
    "model": "precode-model",
    "training-state": "precode-training-state",
    "gradients": "precode-gradients",
    "truth": "precode-truth",
    "reconstruction": "precode-reconstruction",
    "attack-state": "precode-attack-state",
}
DESCRIPTIONS = {
    "model": "a model file (model.safetensors or checkpoints/epoch-N.safetensors from `precode train`)",
    "training-state": "a training state (checkpoints/resume.safetensors from `precode train`)",
    "gradients": "a gradient dump (from `precode capture-gradients`)",
    "truth": "a truth file (<id>.truth.safetensors from `precode capture-gradients`)",
    "reconstruction": "a reconstruction (from `precode attack`)",
    "attack-state": "an attack checkpoint (RECON_DIR/checkpoints/*.safetensors from `precode attack`)",
}
# JSON metadata keys each kind must carry, besides `format` and `format_version`.
REQUIRED_METADATA = {
    "model": ("model", "defense", "data", "train", "tool"),
    "training-state": ("model", "defense", "data", "train", "tool"),
    "gradients": ("model", "defense", "data", "loss", "capture"),
    "truth": ("data", "dump", "indices", "tool"),
    "reconstruction": ("attack", "source", "model", "defense", "data", "tool"),
    "attack-state": ("attack", "sources", "step", "seed", "tool"),
}
MAX_METADATA_BYTES = 1_000_000
# What to do about a file whose numbers are not all finite, by kind.
REDO = {
    "model": "train the model again (a smaller --lr often helps)",
    "training-state": "train again from the start without --resume",
    "gradients": "capture the gradients again from a model whose loss is finite",
    "truth": "capture the gradients again",
    "reconstruction": "attack the dump again",
    "attack-state": "start the attack over with --force",
}


@dataclass
class StoredFile:
    """Tensors and decoded metadata of one precode file."""

    kind: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with `prefix.`, keyed by the rest of the name."""
        start = len(prefix) + 1
        return {name[start:]: t for name, t in self.tensors.items() if name.startswith(prefix + ".")}


def write(path: Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write a precode file atomically: a crash leaves either the old file or the whole new one."""
    if kind not in FORMAT_NAMES:
        raise ValueError(f"unknown file kind {kind!r}")
    metadata = {"format": FORMAT_NAMES[kind], "format_version": str(FORMAT_VERSION)}
    metadata.update({key: json.dumps(value, sort_keys=True) for key, value in meta.items()})
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(plain, str(tmp), metadata=metadata)


def read(path: Path, kind: str) -> StoredFile:
    """Read and validate a precode file of the given kind; every problem is one `UserError` sentence."""
    path = Path(path)
    raw_meta = read_raw_metadata(path, kind)
    meta = _decode_metadata(path, kind, raw_meta)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} is damaged and cannot be read ({_short(err)}); capture or write it again.") from err
    for name, tensor in tensors.items():
        if not _all_finite(tensor):
            raise UserError(
                f"{path} holds NaN or infinite values in tensor {_clip(name)}; a usable {kind} file has only finite "
                f"numbers, so {REDO[kind]}."
            )
    return StoredFile(kind=kind, tensors=tensors, meta=meta)


def read_raw_metadata(path: Path, kind: str) -> dict[str, str]:
    """The file's metadata strings, after checking that it is a precode file of `kind` and version."""
    path = Path(path)
    what = DESCRIPTIONS[kind]
    if not path.exists():
        raise UserError(f"{path} does not exist; expected {what}.")
    if not path.is_file():
        raise UserError(f"{path} is not a file; expected {what}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise UserError(f"{path} is not a valid safetensors file ({_short(err)}); expected {what}.") from err
    found = raw.get("format")
    if isinstance(found, str) and found.startswith("precode-") and found not in FORMAT_NAMES.values():
        raise UserError(f"{path} is a {_clip(found)} file, a kind this precode does not know; expected {what}.")
    if found not in FORMAT_NAMES.values():
        raise UserError(f"{path} is a safetensors file but not a precode file (no 'format' metadata); expected {what}.")
    if found != FORMAT_NAMES[kind]:
        other = next(k for k, v in FORMAT_NAMES.items() if v == found)
        raise UserError(f"{path} is {DESCRIPTIONS[other]}, not {what}.")
    version_text = raw.get("format_version", "")
    if not re.fullmatch(r"[0-9]+", version_text):
        raise UserError(f"{path} has an unreadable format_version {_clip(version_text)}; expected {FORMAT_VERSION}.")
    digits = version_text.lstrip("0") or "0"
    # int() refuses over 4300 digits (ValueError); any version that long is newer than this one anyway.
    version = int(digits) if len(digits) <= 18 else FORMAT_VERSION + 1
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} uses file format version {digits if len(digits) <= 18 else digits[:15] + '...'}, newer than the "
            f"version {FORMAT_VERSION} this precode reads; upgrade precode to read it."
        )
    if version < FORMAT_VERSION:
        raise UserError(f"{path} uses file format version {version}, which this precode no longer reads.")
    if sum(len(k) + len(v) for k, v in raw.items()) > MAX_METADATA_BYTES:
        raise UserError(f"{path} has over {MAX_METADATA_BYTES} bytes of metadata; a precode file has far less.")
    return raw


def _decode_metadata(path: Path, kind: str, raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, text in raw.items():
        if key in ("format", "format_version"):
            continue
        try:
            meta[key] = json.loads(text)
        except (ValueError, RecursionError) as err:  # ValueError: bad JSON, or an integer of over 4300 digits
            raise UserError(f"{path} has metadata {_clip(key)} that is not valid JSON; the file is damaged.") from err
    missing = [key for key in REQUIRED_METADATA[kind] if key not in meta]
    if missing:
        raise UserError(f"{path} lacks the metadata {', '.join(missing)} that {DESCRIPTIONS[kind]} must carry.")
    return meta


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes: ties a truth file and a reconstruction to the dump they belong to."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in a floating-point or complex tensor (integer tensors always pass)."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    if not tensor.is_floating_point():
        return True
    if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)  # float8 formats: torch.isfinite is not implemented for them
    return bool(torch.isfinite(tensor).all())


def _clip(text: str, limit: int = 60) -> str:
    """`repr(text)`, shortened: a hostile file's names and values must not flood the one-line message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]

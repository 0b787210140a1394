"""Writing shared model states (format version 2): one file per distinct state, however many dumps use it.

Several shards of one capture may store the same state at the same moment: the file is written
atomically under its content hash, so whichever rename lands last leaves the same bytes' meaning.
"""

from __future__ import annotations

import os
import stat

import torch
from safetensors import SafetensorError, safe_open

from precode_cli import fileformat, states
from precode_cli.outdir import OutputDir


def store(out_dir: OutputDir, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
          tool: dict) -> str:
    """Write OUT/states/<sha256>.safetensors unless an intact copy is there; returns the hash for `state.sha256`."""
    tensors = _tensors(params, buffers)
    sha = states.content_digest(tensors)
    folder = out_dir.subdir(states.STATES_DIR)  # refused if a symlink
    path = folder / f"{sha}.safetensors"
    if not _intact(path, sha):
        fileformat.write(path, "state", tensors, {"content": {"sha256": sha}, "tool": tool})
    return sha


def digest(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> str:
    """The hash `store` would name the state by, without writing anything."""
    return states.content_digest(_tensors(params, buffers))


def _tensors(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {f"param.{n}": p.detach().to("cpu").contiguous() for n, p in params.items()}
    tensors.update({f"buffer.{n}": b.detach().to("cpu").contiguous() for n, b in buffers.items()})
    return tensors


def _intact(path: os.PathLike, sha: str) -> bool:
    """Whether a plain file with exactly this content is already there (written by an earlier dump or shard)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False  # a link or a folder: replaced by the atomic write, never followed
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (FileNotFoundError, SafetensorError, OSError, RuntimeError, ValueError):
        return False
    return states.content_digest(tensors) == sha

"""Model states shared by many dumps (format version 2): named by their content, found only beside the dump.

A capture of thousands of victims from one model would otherwise store the same weights in every
dump. Version 2 stores each distinct state (`param.*` and `buffer.*`) once, in
`GRADS_DIR/states/<sha256>.safetensors`, and a dump names it by that hash alone (`state.sha256`).
A hash is not a path: the reader looks only in the `states/` folder beside the dump, refuses a
folder or file there that is a symbolic link, and checks that the tensors it loaded hash to the
name before anyone uses them. So a hostile dump can neither point outside its folder nor swap the
weights another dump describes.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import torch

from precode_cli.errors import UserError

STATES_DIR = "states"
SHA256_RE = re.compile(r"[0-9a-f]{64}")


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of tensors by name: each one's name, dtype, shape and bytes, independent of file layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-d too
    return digest.hexdigest()


def state_path(dump: Path, sha256: str) -> Path:
    """Where the state a dump names lives: DUMP_DIR/states/<sha256>.safetensors, never through a link."""
    if not SHA256_RE.fullmatch(sha256):  # the schema already refuses this; a second guard costs nothing
        raise UserError(f"{dump} names a model state {sha256[:20]!r} that is not a SHA-256; capture it again.")
    folder = Path(dump).parent / STATES_DIR
    path = folder / f"{sha256}.safetensors"
    for item, what in ((folder, "folder"), (path, "file")):
        try:
            mode = os.lstat(item).st_mode
        except FileNotFoundError:
            raise UserError(f"{dump} stores its model state in {path}, which does not exist; copy the dump's "
                            f"{STATES_DIR}/ folder along with it.") from None
        if stat.S_ISLNK(mode):
            raise UserError(f"{item} is a symbolic link; precode reads a dump's model state only from a real "
                            f"{STATES_DIR}/ folder beside it, so copy the state there.")
        wanted = stat.S_ISDIR(mode) if what == "folder" else stat.S_ISREG(mode)
        if not wanted:
            raise UserError(f"{item} is not a {what}; a dump's model state is a file in the {STATES_DIR}/ folder "
                            "beside it.")
    return path

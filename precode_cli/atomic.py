"""Write files so that a crash never leaves a half-written file under the final name.

Every output goes to a hidden temporary file in the same directory, `.NAME.tmp-<8 random characters>` (a fresh,
unpredictable name created exclusively), and is renamed into place (`os.replace` is atomic on one file
system). A process killed mid-write (SIGKILL, a crash) may leave that temporary file behind, never a
partial file under the final name; the stages only read `*.safetensors`, so a leftover is never mistaken
for a result and can be deleted at any time.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from precode_cli.errors import UserError


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # A new, unpredictable name created with O_EXCL: a file or symlink planted beside `final` (say, in a
    # shared folder) is never written through. The name does not end in ".safetensors", so a leftover
    # from a killed process is never taken for a result by the stages' `*.safetensors` globs.
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # some writers create 0600 files; results are ordinary files
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(final: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(final: Path, data: bytes) -> None:
    """Write a binary file atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    """Stop before any work if an output would replace results already on disk (unless --force)."""
    if force:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        verb = "exists" if len(existing) == 1 else "exist"
        raise UserError(f"{shown} already {verb}; choose another --out directory or pass --force to overwrite.")

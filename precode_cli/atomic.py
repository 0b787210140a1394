"""Write files so that a crash never leaves a half-written file under the final name.

Every output goes to a hidden temporary file in the same directory, `.NAME.tmp-<8 random characters>` (a fresh,
unpredictable name created exclusively), and is renamed into place (`os.replace` is atomic on one file
system). A process killed mid-write (SIGKILL, a crash) may leave that temporary file behind, never a
partial file under the final name; the stages only read `*.safetensors`, so a leftover is never mistaken
for a result and can be deleted at any time. NAME is shortened so that the temporary name fits the file
system's limit on name length.

A write that the operating system refuses (a full disk, a read-only file system, no permission, a
name too long) is one `UserError` sentence that names the file; the temporary file is removed and the
final name keeps its earlier file, if any.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from precode_cli.errors import UserError


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # A new, unpredictable name created with O_EXCL: a file or symlink planted beside `final` (say, in a
        # shared folder) is never written through. The name does not end in ".safetensors", so a leftover
        # from a killed process is never taken for a result by the stages' `*.safetensors` globs.
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(final), dir=final.parent)
        os.close(fd)
    except OSError as err:
        raise _write_error(final, err.errno, err.strerror or str(err)) from err
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())  # some writers create 0600 files; results are ordinary files
        os.replace(tmp, final)
    except Exception as err:
        code = _os_error_code(err)
        if code is None:
            raise
        raise _write_error(final, code, os.strerror(code) if code else str(err)) from err
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                tmp.unlink()


TEMP_TAIL = len(".tmp-") + 8  # what mkstemp adds after NAME: ".tmp-" (our prefix's end) and 8 random characters
# safetensors and other Rust writers report an I/O error as "... (os error 28)", not as OSError.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, that `folder` (or its nearest existing parent) takes; 255 if unknown."""
    folder = Path(folder)
    while not os.path.isdir(folder) and folder.parent != folder:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _temp_prefix(final: Path) -> str:
    """`.NAME.tmp-`, with NAME cut (on bytes) so that the whole temporary name fits the folder's name limit."""
    raw = os.fsencode(final.name)
    keep = max(0, name_max(final.parent) - 1 - TEMP_TAIL)
    return f".{os.fsdecode(raw[:keep])}.tmp-" if len(raw) > keep else f".{final.name}.tmp-"


def _os_error_code(err: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's, or the one a Rust writer put in its message."""
    if isinstance(err, OSError):
        return err.errno or 0
    if isinstance(err, UserError):
        return None
    match = _RUST_OS_ERROR.search(str(err))
    return int(match.group(1)) if match else None


_ADVICE = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "free some space (your disk quota is used up) or choose another --out",
    errno.EROFS: "choose an --out on a writable file system",
    errno.EACCES: "check the folder's permissions or choose another --out",
    errno.EPERM: "check the folder's permissions or choose another --out",
    errno.ENAMETOOLONG: "choose a shorter --out",
    errno.EFBIG: "raise the file size limit (ulimit -f) or choose another --out",
}


def advice_for(code: int | None) -> str:
    """What to do about an operating-system error while writing under --out."""
    return _ADVICE.get(code or 0, "choose another --out")


def _write_error(final: Path, code: int, reason: str) -> UserError:
    advice = advice_for(code)
    return UserError(f"cannot write {final}: {reason}; {advice}; its earlier version, if any, was left as it was.")


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
    for path in paths:
        size, limit = len(os.fsencode(path.name)), name_max(path.parent)
        if size > limit:
            raise UserError(f"cannot write {path}: its name is {size} bytes long, and the file system takes at most "
                            f"{limit}; use shorter file names.")
    if force:
        return
    existing = [p for p in paths if os.path.lexists(p)]  # a dangling symlink counts: it would be replaced
    if existing:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        verb = "exists" if len(existing) == 1 else "exist"
        raise UserError(f"{shown} already {verb}; choose another --out directory or pass --force to overwrite.")

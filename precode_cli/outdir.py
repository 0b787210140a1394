"""The output folder of a command (RUN_DIR, GRADS_DIR, RECON_DIR, REPORT_DIR): one writer, no detours.

Every stage runs inside `with OutputDir(out) as out_dir:`. On entry `--out` is checked (an existing file
is refused); `out_dir.lock()`, called once the command's inputs are valid and just before its first
write, creates the folder and takes an exclusive lock on `OUT/.precode.lock` for the rest of the run, so
two precode commands never write into one folder at once. Shards of one job array (`--shard K/N`) write
disjoint files into one folder: each holds `.precode.lock` shared, so the shards run together while an
unsharded command is kept out (and keeps them out), and `.precode.shard-K-of-N.lock` exclusive, so one
shard never runs twice at once. What several shards write alike (a shared model state) is written
atomically under its content hash. The lock files is empty and never deleted
(deleting a lock file that others may have open is racy); the stages read only `*.safetensors`, so
they ignore it.

Sub-folders (`checkpoints/`) are used only through `subdir`, `files` and `remove`: a sub-folder or
file there that is a symbolic link is refused, never followed, and deletion works on file descriptors
opened without following links, so nothing outside `--out` is read, written or deleted through them.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Iterable

from precode_cli.atomic import advice_for
from precode_cli.errors import UserError
from precode_cli.shards import Shard

LOCK_NAME = ".precode.lock"
SHARD_LOCK = ".precode.shard-{label}.lock"


def _planted(path: Path) -> UserError:
    return UserError(f"{path} is a symbolic link that precode did not create; remove it or choose another --out.")


class OutputDir:
    """The folder a command writes into; see the module docstring."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock_fds: list[int] = []

    def __enter__(self) -> "OutputDir":
        try:
            st = os.stat(self.path)  # --out may itself be a symlink to a folder: the user chose it
        except FileNotFoundError:
            if os.path.islink(self.path):
                raise UserError(f"--out {self.path} is a symbolic link to nothing; remove it or choose another "
                                "--out.") from None
            return self
        except OSError as err:
            raise UserError(f"--out {self.path} cannot be used ({err.strerror or err}); "
                            f"{advice_for(err.errno)}.") from err
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(f"--out {self.path} is an existing file; choose a folder to write into, or a name that "
                            "does not exist yet.")
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.unlock()

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    def lock(self, shard: Shard | None = None) -> None:
        """Create the folder and hold its lock until the command ends; refuse if another command holds it.

        Unsharded: `.precode.lock` exclusive. Shard K/N: `.precode.lock` shared and its own shard lock exclusive.
        """
        if self._lock_fds:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            reason = err.strerror or err
            raise UserError(f"cannot create --out {self.path}: {reason}; {advice_for(err.errno)}.") from err
        try:
            if shard is None:
                self._take(self.lock_path, fcntl.LOCK_EX, "another precode command is writing to")
            else:
                self._take(self.lock_path, fcntl.LOCK_SH, "a precode command without --shard is writing to")
                self._take(self.path / SHARD_LOCK.format(label=shard.label), fcntl.LOCK_EX,
                           f"another precode command is writing shard {shard.index}/{shard.count} to")
        except UserError:
            self.unlock()
            raise

    def _take(self, path: Path, mode: int, busy: str) -> None:
        flags = os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _planted(path) from err
            raise UserError(f"cannot open the lock file {path}: {err.strerror or err}; remove it or "
                            "choose another --out.") from err
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{busy} {self.path} (lock {path} held); wait for it to finish or choose another "
                                "--out.") from err
            raise UserError(f"cannot lock {path}: {err.strerror or err}; choose another --out.") from err
        self._lock_fds.append(fd)

    def unlock(self) -> None:
        """Release the locks (closing the files does); the lock files stay."""
        while self._lock_fds:
            os.close(self._lock_fds.pop())

    def subdir(self, name: str, create: bool = True) -> Path:
        """OUT/name, refused if it is a symlink or not a folder; created (with `create`) if it does not exist."""
        path = self.path / name
        for _ in range(2):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return path
                try:
                    self.path.mkdir(parents=True, exist_ok=True)
                    os.mkdir(path)
                    return path
                except FileExistsError:
                    continue  # made by someone else just now: check what it is
                except OSError as err:
                    raise UserError(f"cannot create {path}: {err.strerror or err}; choose another --out.") from err
            except OSError as err:
                raise UserError(f"cannot use {path}: {err.strerror or err}; choose another --out.") from err
            if stat.S_ISLNK(st.st_mode):
                raise _planted(path)
            if not stat.S_ISDIR(st.st_mode):
                raise UserError(f"{path} is a file where precode keeps a folder; remove it or choose another --out.")
            return path
        raise UserError(f"{path} keeps changing while precode checks it; choose another --out.")

    def files(self, name: str, pattern: str) -> list[Path]:
        """The files in OUT/name matching `pattern`, sorted; a symlink or a non-file among them is refused."""
        folder = self.subdir(name, create=False)
        if not os.path.lexists(folder):
            return []
        found = []
        for path in sorted(folder.glob(pattern)):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue  # removed since the glob (by the command that holds the lock)
            if stat.S_ISLNK(mode):
                raise _planted(path)
            if not stat.S_ISREG(mode):
                raise UserError(f"{path} is not a file; remove it or choose another --out.")
            found.append(path)
        return found

    def remove(self, name: str, *, pattern: str | None = None, names: Iterable[str] = (),
               drop_if_empty: bool = False) -> None:
        """Delete the entries of OUT/name called `names` or matching `pattern` (a symlink: the link only).

        The folder is opened with O_NOFOLLOW and entries are unlinked relative to it, so a folder or
        entry swapped for a symlink meanwhile cannot send the deletion outside --out. With
        `drop_if_empty` the folder goes too once nothing else is left in it.
        """
        self.subdir(name, create=False)
        try:
            parent = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            try:
                folder = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            except FileNotFoundError:
                return
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise _planted(self.path / name) from err
                raise
            try:
                wanted = set(names)
                for entry in sorted(os.listdir(folder)):
                    chosen = entry in wanted or (pattern is not None and fnmatch.fnmatchcase(entry, pattern))
                    if chosen and not stat.S_ISDIR(
                            os.stat(entry, dir_fd=folder, follow_symlinks=False).st_mode):
                        os.unlink(entry, dir_fd=folder)
            finally:
                os.close(folder)
            if drop_if_empty:
                try:
                    os.rmdir(name, dir_fd=parent)
                except OSError as err:
                    if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                        raise
        except OSError as err:
            raise UserError(f"cannot remove old files in {self.path / name}: {err.strerror or err}; "
                            "remove them by hand or choose another --out.") from err
        finally:
            os.close(parent)

"""PNG runs claim the digit indices they write in a folder, so that two runs never write over each other.

A PNG run writes one file per digit, over minutes, and (with ``overwrite``) replaces what is there: two
runs over the same indices at once would leave a folder of both. Each run locks the byte range of its
indices in a zero-byte lock file in the folder (:data:`LOCK_FILE`), so runs of other indices, the shards of
one job array, still write side by side; the file is there only while a run writes (or after one was
killed). Windows has no such lock.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from digitgen.runtime.errors import OutputError
from digitgen.runtime.files import AS_ITSELF, open_locked
from digitgen.runtime.signals import interrupts_held

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".digitgen.lock"

# Linux's open-file-description locks belong to the open file, not to the process: two runs in one process
# (threads) exclude each other too, and closing another descriptor of the file drops neither's lock.
# Elsewhere POSIX record locks, which exclude other processes only.
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock of 64-bit Linux: type, whence, start, length, pid
_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None) if sys.platform == "linux" and _FLOCK.size == 32 else None


def _lock(fd: int, start: int, stop: int | None, *, exclusive: bool) -> bool:
    """Lock bytes ``start .. stop-1`` of ``fd`` (from ``start`` on for ``None``); False if a lock of another
    holder is in the way."""
    length = 0 if stop is None else stop - start  # 0: to the end, wherever it comes to be
    try:
        if _OFD_SETLK is not None:
            kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
            fcntl.fcntl(fd, _OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
        else:
            fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB, length, start)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def _refuse_if_not_a_lock(fd: int, path: Path) -> None:
    """The lock file is an empty regular file: anything else of its name is a user's, never used nor removed."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size:
        raise OutputError(f"{path} is not a lock file of digitgen's, an empty file a PNG run keeps there; move it")


def _in_use(folder: Path) -> OutputError:
    return OutputError(
        f"another run is writing PNG digits of the same indices to {folder} now; let it finish, or write elsewhere"
    )


@contextmanager
def claim_indices(folder: Path, start: int, stop: int | None) -> Iterator[None]:
    """Hold the PNG indices ``start .. stop-1`` of ``folder`` (every one from ``start`` for ``None``) while the
    block writes them; :class:`OutputError` if another run holds any of them. The last run to let go removes
    the lock file, so a folder keeps only the digits."""
    if fcntl is None:
        yield
        return
    path = folder / LOCK_FILE
    fd = None
    try:
        with interrupts_held():  # a lock file opened is one noted, which this run removes if it is the last
            fd = _open_locked(path, start, stop)
        yield
    finally:
        if fd is not None:
            with interrupts_held():
                if _lock(fd, 0, None, exclusive=True):  # no other run holds any index: the file is this run's alone
                    path.unlink(missing_ok=True)
                os.close(fd)  # and with it the lock


def _open_locked(path: Path, start: int, stop: int | None) -> int:
    """A descriptor of ``path``, created if need be, holding the lock of ``start .. stop-1``."""

    def lock(fd: int) -> bool:
        _refuse_if_not_a_lock(fd, path)
        return _lock(fd, start, stop, exclusive=True)

    fd = open_locked(path, lock, lambda exc: OutputError(f"cannot write {path}: {exc.strerror}"))
    if fd is None:
        raise _in_use(path.parent)
    return fd


def refuse_if_indices_claimed(folder: Path, start: int, stop: int | None) -> None:
    """Refuse now, before any work, if another run holds some of these indices (see :func:`claim_indices`); a
    shared lock for the look, so that runs looking at once do not refuse each other."""
    if fcntl is None:
        return
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | AS_ITSELF)
    except OSError:  # none there (or none this process may read): the claim itself decides later
        return
    try:
        _refuse_if_not_a_lock(fd, folder / LOCK_FILE)
        if not _lock(fd, start, stop, exclusive=False):
            raise _in_use(folder)
    finally:
        os.close(fd)

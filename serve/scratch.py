"""The scratch folder of a server with several workers: the model's copy and the workers' metrics files.

The supervisor makes it in the temporary folder and removes it when it stops. One killed first (``kill -9``, an
out-of-memory killer) cannot, so the folder holds a lock file that the supervisor locks for as long as it runs;
a server that starts removes every such folder whose lock nobody holds (:func:`remove_abandoned`). Windows has
no such lock, nor have some network filesystems: there the folder of a killed server stays.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from digitgen.runtime.files import locking_available, try_flock

PREFIX = "digitgen-serve-"
LOCK_FILE = ".lock"  # empty; locked (flock) by the supervisor that made the folder, until it stops


@contextmanager
def scratch_folder() -> Iterator[Path]:
    """A new private folder in the temporary folder, locked while the context lasts and removed at its end (the
    lock file last, while still locked); ``OSError`` if it cannot be made."""
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    lock = None
    try:
        lock = _lock(folder)
        yield folder
    finally:
        for entry in folder.iterdir():
            if entry.name != LOCK_FILE:
                _remove(entry)
        shutil.rmtree(folder, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _lock(folder: Path) -> int | None:
    """Lock a new lock file in ``folder``; its descriptor, which holds the lock until it is closed, or ``None``
    where files cannot be locked. The file is locked under another name and then renamed, so that no other server
    ever finds it unlocked."""
    if not locking_available():
        return None
    unnamed = folder / f"{LOCK_FILE}.new"
    fd = os.open(unnamed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        locked = try_flock(fd)  # a new file, which no other process has opened
    except OSError:  # a filesystem without flock (ENOLCK, EOPNOTSUPP): the folder serves unlocked
        locked = False
    if not locked:
        os.close(fd)
        return None
    os.rename(unnamed, folder / LOCK_FILE)
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_abandoned(temporary: Path | None = None) -> list[Path]:
    """Remove the scratch folders in ``temporary`` (default: the temporary folder) that are this user's and whose
    lock no process holds (their server was killed); return them. A folder without its lock file (one being made)
    is left alone, as is anything else, and nothing stops a server from starting: a folder that cannot be read, or
    no temporary folder at all, is passed over."""
    if not locking_available():
        return []
    try:
        temporary = temporary or Path(tempfile.gettempdir())
        with os.scandir(temporary) as entries:
            found = [Path(entry.path) for entry in entries if entry.name.startswith(PREFIX)]
    except OSError:  # no such folder, or not readable: nothing of ours to remove there
        return []
    removed = []
    for folder in filter(_abandoned, found):
        try:
            shutil.rmtree(folder)
        except OSError:  # left for the next server to try
            continue
        removed.append(folder)
    return removed


def _abandoned(folder: Path) -> bool:
    """Whether ``folder`` is a scratch folder of this user's whose lock no process holds."""
    try:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a pipe would block
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and try_flock(fd)  # held: its server runs
    except OSError:  # a filesystem without flock: nothing tells a live folder from an abandoned one
        return False
    finally:
        os.close(fd)  # a lock just taken goes with it; the folder is removed next

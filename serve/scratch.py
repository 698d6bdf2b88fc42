"""The scratch folder of a server with several workers: the model's copy and the workers' metrics files.

The supervisor makes it in the temporary folder and removes it when it stops. One killed first (``kill -9``, an
out-of-memory killer) cannot, so the folder holds a lock file that the supervisor locks for as long as it runs;
a server that starts removes every such folder whose lock nobody holds (:func:`remove_abandoned`). Windows has
no such lock: there the folder of a killed server stays.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

PREFIX = "digitgen-serve-"
LOCK_FILE = ".lock"  # empty; locked (flock) by the supervisor that made the folder, until it stops


@contextmanager
def scratch_folder() -> Iterator[Path]:
    """A new private folder in the temporary folder, locked while the context lasts and removed at its end;
    ``OSError`` if it cannot be made."""
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        with _locked(folder):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the lock of ``folder`` while the context lasts. The lock file is locked under another name and then
    renamed, so that no other server ever finds it unlocked."""
    if fcntl is None:
        yield
        return
    unnamed = folder / f"{LOCK_FILE}.new"
    fd = os.open(unnamed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(unnamed, folder / LOCK_FILE)
        yield
    finally:
        os.close(fd)


def remove_abandoned(temporary: Path) -> list[Path]:
    """Remove the scratch folders in ``temporary`` that are this user's and whose lock no process holds (their
    server was killed); return them. A folder without its lock file (one being made) is left alone, as is
    anything else."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    with suppress(OSError):
        for entry in os.scandir(temporary):
            if entry.name.startswith(PREFIX) and _abandoned(Path(entry.path)):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
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
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its server runs
        return False
    finally:
        os.close(fd)  # a lock just taken goes with it; the folder is removed next
    return True

"""One training run at a time in a run directory: a lock on the folder itself, held while a process trains there."""

from __future__ import annotations

import os
from pathlib import Path

from digitgen.training.errors import RunDirectoryError

try:
    import fcntl
except ImportError:  # Windows: no lock, as for the runtime's temporary files
    fcntl = None


class RunLock:
    """A run directory claimed by this process (``flock`` on the folder: no file is added to it). A second run
    into the same folder, a job started twice or a resume while the first run still trains, is refused rather
    than interleaved with it, and its ``--overwrite`` cannot delete a live run's files. The lock goes with the
    process however it ends; :meth:`release` lets it go sooner."""

    def __init__(self, run_dir: Path, *, shared: bool = False) -> None:
        """Lock ``run_dir`` (it must exist); :class:`RunDirectoryError` if another process trains there now. A
        ``shared`` lock only looks: runs looking at once do not refuse each other."""
        self._fd: int | None = None
        if fcntl is None:
            return
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryError(
                f"another run is training in {run_dir} now; let it finish (or stop it), or give another --out"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def refuse_if_training(run_dir: Path) -> None:
    """Refuse now, before any other check of ``run_dir`` speaks of its files, if a process trains there."""
    if run_dir.is_dir():
        RunLock(run_dir, shared=True).release()

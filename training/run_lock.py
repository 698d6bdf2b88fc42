"""One training run at a time in a run directory: a lock on the folder itself, held while a process trains there."""

from __future__ import annotations

import os
from pathlib import Path

from digitgen.runtime.files import held_elsewhere, locking_available, try_flock
from digitgen.training.errors import RunDirectoryError


class RunLock:
    """A run directory claimed by this process (``flock`` on the folder: no file is added to it). A second run
    into the same folder, a job started twice or a resume while the first run still trains, is refused rather
    than interleaved with it, and its ``--overwrite`` cannot delete a live run's files. The lock goes with the
    process however it ends; :meth:`release` lets it go sooner."""

    def __init__(self, run_dir: Path) -> None:
        """Lock ``run_dir`` (it must exist); :class:`RunDirectoryError` if another process trains there now."""
        self._fd: int | None = None
        if not locking_available():
            return
        fd = os.open(run_dir, os.O_RDONLY)
        if not try_flock(fd):
            os.close(fd)
            raise _training_in(run_dir)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def refuse_if_training(run_dir: Path) -> None:
    """Refuse now, before any other check of ``run_dir`` speaks of its files, if a process trains there (a look
    that other processes looking at once do not see: every process of a torchrun looks)."""
    if held_elsewhere(run_dir):
        raise _training_in(run_dir)


def _training_in(run_dir: Path) -> RunDirectoryError:
    return RunDirectoryError(
        f"another run is training in {run_dir} now; let it finish (or stop it), or give another --out"
    )

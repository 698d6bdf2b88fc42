"""Files appear complete or not at all, and nothing is replaced without permission."""

from __future__ import annotations

import filecmp
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from digitgen.runtime.errors import OutputError


def temporary_name(path: Path) -> Path:
    """Where :func:`publish` writes ``path`` before renaming it: a hidden sibling."""
    return path.with_name(f".{path.name}.part")


@contextmanager
def publish(path: str | Path, keep_identical: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` only if the block succeeds.

    With ``keep_identical``, an existing ``path`` that already holds exactly the new bytes is left
    untouched (same file, same modification time).
    Writing or renaming that fails (a full disk, a folder in the way) raises :class:`OutputError`.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if not (keep_identical and path.is_file() and filecmp.cmp(tmp, path, shallow=False)):
            os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is None:  # one of the project's own errors, raised in the block: already worded
            raise
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path, keep_identical: bool = False) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing through :func:`publish`."""
    with publish(path, keep_identical) as tmp, tmp.open("wb") as f:
        yield f


def refuse_existing(paths: Iterable[str | Path | None], overwrite: bool) -> None:
    """Raise :class:`OutputError` if any of ``paths`` exists and ``overwrite`` is not set."""
    clashes = [Path(p) for p in paths if p is not None and Path(p).exists()]
    if clashes and not overwrite:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise OutputError(f"{clashes[0]}{more} already exists; pass --overwrite to replace")

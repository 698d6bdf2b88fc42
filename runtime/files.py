"""Files appear complete or not at all, and nothing is replaced without permission."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from digitgen.runtime.errors import OutputError


@contextmanager
def publish(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing through :func:`publish`."""
    with publish(path) as tmp, tmp.open("wb") as f:
        yield f


def refuse_existing(paths: Iterable[str | Path | None], overwrite: bool) -> None:
    """Raise :class:`OutputError` if any of ``paths`` exists and ``overwrite`` is not set."""
    clashes = [Path(p) for p in paths if p is not None and Path(p).exists()]
    if clashes and not overwrite:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise OutputError(f"{clashes[0]}{more} already exists; pass --overwrite to replace")

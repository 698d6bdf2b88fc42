"""Write generated digits as PNG files, a contact sheet, an NPZ archive or an MNIST IDX pair.

Every file is written under a temporary name and renamed when complete, so an interrupted or
failed run leaves complete files or none. Batches stream in, so PNG and IDX output use memory
independent of the number of digits.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from runtime.errors import InvalidRequestError, OutputError
from runtime.generator import GeneratedDigits

FORMATS = ("png", "grid", "npz", "idx")
GRID_FILE = "grid.png"
NPZ_FILE = "digits.npz"
IDX_IMAGES_FILE = "train-images-idx3-ubyte"
IDX_LABELS_FILE = "train-labels-idx1-ubyte"
GRID_COLUMNS = 10
GRID_MAX_DIGITS = 10_000
GRID_GAP = 2
PNG_NAME = re.compile(r"^(\d{8,})_label\d+\.png$")

OnBatch = Callable[[int], None]


def png_name(index: int, label: int) -> str:
    return f"{index:08d}_label{label}.png"


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` only on success."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        with tmp.open("wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_output_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents) or explain in one line why it cannot be used."""
    out_dir = Path(out_dir)
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is" if parent == out_dir else f"lies under {parent}, which is"
            raise OutputError(f"output directory {out_dir} {where} an existing file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output directory {out_dir}: {exc.strerror or exc}") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {out_dir} is not writable")
    return out_dir


def existing_outputs(out_dir: Path, fmt: str, start: int, num: int) -> list[Path]:
    """Files a run would replace: named outputs of ``fmt``, or PNGs for indices in range."""
    if fmt == "png":
        clashes = []
        for entry in os.scandir(out_dir):
            match = PNG_NAME.match(entry.name)
            if match and start <= int(match.group(1)) < start + num:
                clashes.append(Path(entry.path))
        return sorted(clashes)
    names = {"grid": [GRID_FILE], "npz": [NPZ_FILE], "idx": [IDX_IMAGES_FILE, IDX_LABELS_FILE]}[fmt]
    return [out_dir / name for name in names if (out_dir / name).exists()]


def _write_png(image: np.ndarray, path: Path) -> None:
    with _atomic_file(path) as f:
        Image.fromarray(image, mode="L").save(f, format="PNG")


def _write_pngs(batches: Iterable[GeneratedDigits], out_dir: Path, on_batch: OnBatch) -> list[Path]:
    written = []
    for batch in batches:
        for offset, (image, label) in enumerate(zip(batch.images, batch.labels, strict=True)):
            path = out_dir / png_name(batch.start + offset, int(label))
            _write_png(image, path)
            written.append(path)
        on_batch(len(batch.labels))
    return written


def _collect(batches: Iterable[GeneratedDigits], num: int, on_batch: OnBatch) -> GeneratedDigits:
    images = np.empty((num, 28, 28), dtype=np.uint8)
    labels = np.empty(num, dtype=np.int64)
    filled = 0
    for batch in batches:
        n = len(batch.labels)
        images[filled : filled + n], labels[filled : filled + n] = batch.images, batch.labels
        filled += n
        on_batch(n)
    return GeneratedDigits(images, labels)


def contact_sheet(images: np.ndarray, columns: int = GRID_COLUMNS) -> np.ndarray:
    """Tile (N, 28, 28) images into one uint8 picture, ``columns`` per row, gray gaps between."""
    rows = -(-len(images) // columns)
    cell = 28 + GRID_GAP
    sheet = np.full((rows * cell + GRID_GAP, columns * cell + GRID_GAP), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[GRID_GAP + r * cell : GRID_GAP + r * cell + 28, GRID_GAP + c * cell : GRID_GAP + c * cell + 28] = image
    return sheet


def _write_grid(batches: Iterable[GeneratedDigits], out_dir: Path, num: int, on_batch: OnBatch) -> list[Path]:
    path = out_dir / GRID_FILE
    _write_png(contact_sheet(_collect(batches, num, on_batch).images), path)
    return [path]


def _write_npz(batches: Iterable[GeneratedDigits], out_dir: Path, num: int, on_batch: OnBatch) -> list[Path]:
    digits = _collect(batches, num, on_batch)
    path = out_dir / NPZ_FILE
    with _atomic_file(path) as f:
        np.savez_compressed(f, images=digits.images, labels=digits.labels)
    return [path]


def _write_idx(batches: Iterable[GeneratedDigits], out_dir: Path, num: int, on_batch: OnBatch) -> list[Path]:
    """MNIST IDX pair (big-endian headers: magic, count, rows, cols), streamed batch by batch."""
    images_path, labels_path = out_dir / IDX_IMAGES_FILE, out_dir / IDX_LABELS_FILE
    with _atomic_file(images_path) as images_f, _atomic_file(labels_path) as labels_f:
        images_f.write(struct.pack(">IIII", 0x00000803, num, 28, 28))
        labels_f.write(struct.pack(">II", 0x00000801, num))
        for batch in batches:
            images_f.write(batch.images.tobytes())
            labels_f.write(batch.labels.astype(np.uint8).tobytes())
            on_batch(len(batch.labels))
    return [images_path, labels_path]


def write_digits(
    batches: Iterable[GeneratedDigits],
    out_dir: str | Path,
    fmt: str,
    num: int,
    *,
    start: int = 0,
    overwrite: bool = False,
    on_batch: OnBatch = lambda n: None,
) -> list[Path]:
    """Write ``num`` digits from ``batches`` to ``out_dir`` in ``fmt``; returns the files written."""
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "grid" and num > GRID_MAX_DIGITS:
        raise InvalidRequestError(f"a grid holds at most {GRID_MAX_DIGITS} digits; use png, npz or idx")
    out_dir = prepare_output_dir(out_dir)
    clashes = existing_outputs(out_dir, fmt, start, num)
    if clashes and not overwrite:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise OutputError(f"{clashes[0]}{more} already exists; pass --overwrite to replace")
    if fmt == "png":
        return _write_pngs(batches, out_dir, on_batch)
    writer = {"grid": _write_grid, "npz": _write_npz, "idx": _write_idx}[fmt]
    return writer(batches, out_dir, num, on_batch)

"""Write generated digits as PNG files, a contact sheet, an NPZ archive or an MNIST IDX pair.

Every file is written under a temporary name and renamed when complete, so an interrupted or
failed run leaves complete files or none. Batches stream in, so PNG and IDX output use memory
independent of the number of digits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from digitgen.runtime.encode import grid_png_bytes, idx_records, npz_bytes, png_bytes
from digitgen.runtime.errors import InvalidRequestError, OutputError
from digitgen.runtime.files import atomic_file, refuse_existing
from digitgen.runtime.generator import DEFAULT_BATCH_SIZE, DigitGenerator, GeneratedDigits
from digitgen.runtime.idx import idx_header
from digitgen.runtime.shards import WHOLE, Shard, concat_idx, concat_npz, find_shards

FORMATS = ("png", "grid", "npz", "idx")
GRID_FILE = "grid.png"
NPZ_FILE = "digits.npz"
IDX_IMAGES_FILE = "train-images-idx3-ubyte"
IDX_LABELS_FILE = "train-labels-idx1-ubyte"
GRID_MAX_DIGITS = 10_000
PNG_NAME = re.compile(r"^(\d{8,})_label\d+\.png$")

OnBatch = Callable[[int], None]


def png_name(index: int, label: int) -> str:
    return f"{index:08d}_label{label}.png"


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


def output_names(fmt: str, shard: Shard = WHOLE) -> list[str]:
    """File names a non-PNG format writes (PNG names depend on index and label)."""
    names = {"grid": [GRID_FILE], "npz": [NPZ_FILE], "idx": [IDX_IMAGES_FILE, IDX_LABELS_FILE]}[fmt]
    return [shard.name(name) for name in names]


def pngs_in_range(out_dir: Path, start: int, stop: int) -> list[Path]:
    """PNG digits in ``out_dir`` whose index lies in ``[start, stop)``, whatever their label."""
    found = []
    for entry in os.scandir(out_dir):
        match = PNG_NAME.match(entry.name)
        if match and start <= int(match.group(1)) < stop:
            found.append(Path(entry.path))
    return sorted(found)


def existing_outputs(out_dir: Path, fmt: str, shard: Shard, total: int) -> list[Path]:
    """Files a run would replace: named outputs of ``fmt``, or PNGs for indices in range."""
    if fmt == "png":
        return pngs_in_range(out_dir, *shard.bounds(total))
    return [out_dir / name for name in output_names(fmt, shard) if (out_dir / name).exists()]


def _checked(batches: Iterable[GeneratedDigits], start: int, stop: int) -> Iterator[GeneratedDigits]:
    """``batches`` while they hold exactly the digits ``start .. stop-1`` in order; a typed error otherwise."""
    expected = start
    for batch in batches:
        if batch.start != expected or expected + len(batch.labels) > stop:
            raise InvalidRequestError(
                f"the batches do not hold digits {start}..{stop - 1} in order: got {len(batch.labels)} "
                f"starting at {batch.start} after {expected - start}; nothing was written"
            )
        expected += len(batch.labels)
        yield batch
    if expected != stop:
        raise InvalidRequestError(
            f"the batches held {expected - start} digits, not the {stop - start} promised; nothing was written"
        )


def _write_png(image: np.ndarray, path: Path) -> None:
    with atomic_file(path) as f:
        f.write(png_bytes(image))


def _write_pngs(batches: Iterable[GeneratedDigits], out_dir: Path, replaced: list[Path], on_batch: OnBatch) -> None:
    """One PNG per digit; a replaced file of the same index but another label is removed, so an index
    never has two labels in one folder."""
    stale: dict[int, list[Path]] = {}
    for path in replaced:
        stale.setdefault(int(PNG_NAME.match(path.name).group(1)), []).append(path)
    for batch in batches:
        for offset, (image, label) in enumerate(zip(batch.images, batch.labels, strict=True)):
            path = out_dir / png_name(batch.start + offset, int(label))
            _write_png(image, path)
            for old in stale.pop(batch.start + offset, []):
                if old != path:
                    old.unlink(missing_ok=True)
        on_batch(len(batch.labels))


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


def _write_grid(batches: Iterable[GeneratedDigits], paths: list[Path], num: int, on_batch: OnBatch) -> None:
    with atomic_file(paths[0]) as f:
        f.write(grid_png_bytes(_collect(batches, num, on_batch).images))


def _save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_file(path) as f:
        f.write(npz_bytes(images, labels))


def _write_npz(batches: Iterable[GeneratedDigits], paths: list[Path], num: int, on_batch: OnBatch) -> None:
    digits = _collect(batches, num, on_batch)
    _save_npz(paths[0], digits.images, digits.labels)


def _write_idx(batches: Iterable[GeneratedDigits], paths: list[Path], num: int, on_batch: OnBatch) -> None:
    """MNIST IDX pair (big-endian headers: magic, count, rows, cols), streamed batch by batch."""
    images_path, labels_path = paths
    with atomic_file(images_path) as images_f, atomic_file(labels_path) as labels_f:
        images_f.write(idx_header(num, images=True))
        labels_f.write(idx_header(num, images=False))
        for batch in batches:
            image_records, label_records = idx_records(batch.images, batch.labels)
            images_f.write(image_records)
            labels_f.write(label_records)
            on_batch(len(batch.labels))


def write_digits(
    batches: Iterable[GeneratedDigits],
    out_dir: str | Path,
    fmt: str,
    total: int,
    *,
    shard: Shard = WHOLE,
    overwrite: bool = False,
    on_batch: OnBatch = lambda n: None,
) -> list[Path]:
    """Write ``shard`` of a ``total``-digit request, streamed from ``batches``.

    ``batches`` must hold exactly the shard's digits, in order (as :meth:`DigitGenerator.iter_batches`
    yields them); anything else raises :class:`InvalidRequestError` and leaves no file. Returns the
    files written; for ``png``, whose files are many, the output directory.
    """
    if fmt not in FORMATS:
        raise InvalidRequestError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    start, stop = shard.check(total).bounds(total)
    if fmt == "grid" and stop - start > GRID_MAX_DIGITS:
        raise InvalidRequestError(f"a grid holds at most {GRID_MAX_DIGITS} digits; use png, npz or idx")
    out_dir = prepare_output_dir(out_dir)
    replaced = existing_outputs(out_dir, fmt, shard, total)
    refuse_existing(replaced, overwrite)
    batches = _checked(batches, start, stop)
    if fmt == "png":
        try:
            _write_pngs(batches, out_dir, replaced, on_batch)
        except InvalidRequestError:
            for path in pngs_in_range(out_dir, start, stop):
                path.unlink()
            raise
        return [out_dir]
    paths = [out_dir / name for name in output_names(fmt, shard)]
    {"grid": _write_grid, "npz": _write_npz, "idx": _write_idx}[fmt](batches, paths, stop - start, on_batch)
    return paths


def generate_files(
    gen: DigitGenerator,
    out_dir: str | Path,
    num: int,
    fmt: str = "png",
    *,
    digits: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard: Shard = WHOLE,
    overwrite: bool = False,
    truncation: float | None = None,
    on_batch: OnBatch = lambda n: None,
) -> list[Path]:
    """What ``digitgen generate`` does: make ``shard`` of ``num`` digits with ``gen`` and write them as ``fmt``.

    Returns the files written (for ``png``, the output directory).
    """
    gen.check_digits(digits)
    start, stop = shard.check(num).bounds(num)
    batches = gen.iter_batches(stop - start, digits, seed, batch_size, start=start, truncation=truncation)
    return write_digits(batches, out_dir, fmt, num, shard=shard, overwrite=overwrite, on_batch=on_batch)


def merge_shards(out_dir: str | Path, fmt: str, *, overwrite: bool = False) -> list[Path]:
    """Join the shard files of ``fmt`` ("idx" or "npz") in ``out_dir`` into the unsharded files."""
    out_dir = Path(out_dir)
    if fmt not in ("idx", "npz"):
        raise InvalidRequestError(f"merge joins idx or npz shards, not {fmt!r}")
    if not out_dir.is_dir():
        raise OutputError(f"{out_dir} is not a directory")
    targets = [out_dir / name for name in output_names(fmt)]
    refuse_existing([path for path in targets if path.exists()], overwrite)
    parts = [find_shards(out_dir, path.name) for path in targets]
    if fmt == "npz":
        merged = concat_npz(parts[0])
        _save_npz(targets[0], merged["images"], merged["labels"])
        return targets
    for target, shard_files, images in zip(targets, parts, (True, False), strict=True):
        with atomic_file(target) as out:
            concat_idx(shard_files, images, out)
    return targets

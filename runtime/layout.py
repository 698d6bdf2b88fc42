"""Where generated digits go: the file names of each format and shard, and the files of a request already in an
output folder (its outputs, and the temporary files a killed run left)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from digitgen.runtime.errors import InvalidRequestError
from digitgen.runtime.files import temporary_name
from digitgen.runtime.idx import MNIST_FILES, MNIST_RAW
from digitgen.runtime.run_record import record_name
from digitgen.runtime.shards import WHOLE, Shard

FORMATS = ("png", "grid", "npz", "idx", "mnist")
GRID_FILE = "grid.png"
NPZ_FILE = "digits.npz"
IDX_IMAGES_FILE, IDX_LABELS_FILE = MNIST_FILES[:2]  # the train split's names
DEFAULT_TEST_COUNT = 10_000  # the size of MNIST's own test split
GRID_MAX_DIGITS = 10_000
_DIGIT_NAME = r"([0-9]{8}|[1-9][0-9]{8,})_label(?:0|[1-9][0-9]*)\.png"  # png_name()'s names only (ASCII digits)
PNG_NAME = re.compile(_DIGIT_NAME)
TEMPORARY_PNG = re.compile(rf"\.{_DIGIT_NAME}\.part")  # a PNG's temporary file (files.temporary_name)


def png_name(index: int, label: int) -> str:
    """The file name of digit ``index`` of class ``label``: 00000042_label7.png."""
    return f"{index:08d}_label{label}.png"


def output_names(fmt: str, shard: Shard = WHOLE, recorded: bool = False) -> list[str]:
    """Files a non-PNG format writes, relative to the output directory (PNG names depend on index and label);
    ``recorded``: the shard's run record last (see :mod:`~digitgen.runtime.run_record`)."""
    if fmt == "mnist":
        return [f"{MNIST_RAW}/{name}" for name in MNIST_FILES]
    names = {"grid": [GRID_FILE], "npz": [NPZ_FILE], "idx": [IDX_IMAGES_FILE, IDX_LABELS_FILE]}[fmt]
    record = [record_name(fmt, shard)] if recorded else []
    return [shard.name(name) for name in names] + record


def pngs_in_range(out_dir: Path, start: int, stop: int) -> list[Path]:
    """PNG digits in ``out_dir`` whose index lies in ``[start, stop)``, whatever their label."""
    found = []
    for entry in os.scandir(out_dir):
        match = PNG_NAME.fullmatch(entry.name)
        if match and start <= int(match.group(1)) < stop:
            found.append(Path(entry.path))
    return sorted(found)


def holds_pngs(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds any PNG digit, whatever its index."""
    with os.scandir(out_dir) as entries:
        return any(PNG_NAME.fullmatch(entry.name) for entry in entries)


def existing_outputs(out_dir: Path, fmt: str, shard: Shard, total: int, recorded: bool = False) -> list[Path]:
    """Files a run would replace: named outputs of ``fmt``, or PNGs for indices in range."""
    if fmt == "png":
        return pngs_in_range(out_dir, *shard.bounds(total))
    return [out_dir / name for name in output_names(fmt, shard, recorded) if os.path.lexists(out_dir / name)]


def leftover_temporaries(out_dir: Path, fmt: str, shard: Shard, total: int, recorded: bool = False) -> list[Path]:
    """Temporary files of this request's outputs that a killed run (SIGKILL, power loss) left behind."""
    if fmt == "png":
        start, stop = shard.bounds(total)
        return [
            Path(entry.path)
            for entry in os.scandir(out_dir)
            if (match := TEMPORARY_PNG.fullmatch(entry.name)) and start <= int(match.group(1)) < stop
        ]
    names = output_names(fmt, shard, recorded)
    return [path for name in names if (path := temporary_name(out_dir / name)).exists()]


def png_index(path: Path) -> int:
    """The digit index a PNG's name begins with (``00000042_label2.png``: 42); ``path`` must match :data:`PNG_NAME`."""
    return int(PNG_NAME.fullmatch(path.name).group(1))


def check_grid_count(count: int, other_formats: str) -> None:
    """Refuse a contact sheet of more than :data:`GRID_MAX_DIGITS` digits, naming ``other_formats`` instead."""
    if count > GRID_MAX_DIGITS:
        raise InvalidRequestError(f"a grid holds at most {GRID_MAX_DIGITS} digits; use {other_formats}")

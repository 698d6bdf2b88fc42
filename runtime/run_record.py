"""A sharded run's record: the request each IDX or NPZ part was made from, written beside the part, so that
``merge`` joins only parts of one run (an IDX file has no room to say which run wrote it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from digitgen.runtime.contract import MAX_CLASSES
from digitgen.runtime.errors import OutputError
from digitgen.runtime.files import readable_file
from digitgen.runtime.generator import labels_for
from digitgen.runtime.noise import NOISE_SCHEME
from digitgen.runtime.shards import Shard, rerun_damaged
from digitgen.runtime.text import quoted, read_json

RECORDED_FORMATS = ("idx", "npz")  # the formats whose shards merge joins
RECORD_VERSION = 1
_RECORD_NAME = re.compile(r"digitgen-[a-z]+-run-[0-9]{5,}-of-[0-9]{5,}")


def is_recorded(fmt: str, shard: Shard) -> bool:
    """Whether a run of ``fmt`` writing ``shard`` writes a record: the shards that merge joins."""
    return fmt in RECORDED_FORMATS and shard.count > 1


def record_name(fmt: str, shard: Shard) -> str:
    """``digitgen-idx-run-00001-of-00004``: named as its part is, so the glob that removes the IDX parts
    (``rm DIR/*-of-00004``) removes the records too."""
    return shard.name(f"digitgen-{fmt}-run")


def is_record_file(path: Path) -> bool:
    """Whether ``path`` names a run record (see :func:`record_name`)."""
    return _RECORD_NAME.fullmatch(path.name) is not None


def run_record(
    fmt: str, count: int, shards: int, digits: tuple[int, ...], seed: int, truncation: float | None, model: str
) -> bytes:
    """The record of a sharded run of ``count`` digits: the same bytes for each of its shards."""
    record = {
        "record": RECORD_VERSION,
        "format": fmt,
        "count": count,
        "shards": shards,
        "digits": list(digits),
        "seed": seed,
        "truncation": truncation,
        "model_sha256": model,
        "noise": NOISE_SCHEME,
    }
    return (json.dumps(record, indent=1) + "\n").encode()


def _read_record(data: bytes) -> dict | None:
    """``data`` as a run record, or ``None`` if it does not read as one (a damaged record)."""
    try:
        record = read_json(data)
    except ValueError:  # UnicodeDecodeError among them
        return None
    return record if isinstance(record, dict) else None


def is_whole_record(data: bytes) -> bool:
    """Whether ``data`` reads as a run record (a damaged one does not)."""
    return _read_record(data) is not None


def record_paths(out_dir: Path, fmt: str, shards: int) -> list[Path]:
    """Where the records of the ``shards`` parts of ``fmt`` in ``out_dir`` are, in shard order."""
    return [out_dir / record_name(fmt, Shard(index, shards)) for index in range(shards)]


def common_record(out_dir: Path, fmt: str, shards: int) -> dict | None:
    """The record every one of the ``shards`` parts of ``fmt`` in ``out_dir`` carries, or ``None`` where none
    carries one (parts written before records were kept: their sizes are all there is to check).
    :class:`OutputError` naming the shard where parts of different runs meet."""
    records: list[dict | None] = []
    paths = record_paths(out_dir, fmt, shards)
    for index, path in enumerate(paths):
        if not path.exists():
            records.append(None)
            continue
        if not readable_file(path):
            raise OutputError(
                f"{path} is not a file (a folder, a pipe, a device, or a link to one) where shard {index}'s run "
                "record belongs; move it, then run that shard again with --resume"
            )
        record = _read_record(path.read_bytes())
        if record is None:
            raise OutputError(f"{path} is not a run record (damaged?); {rerun_damaged(index)}")
        records.append(record)
    if all(record is None for record in records):
        return None
    first = next(index for index, record in enumerate(records) if record is not None)
    for index, record in enumerate(records):
        if record is None:
            raise OutputError(
                f"{out_dir}: shard {index} has no run record ({paths[index].name}) where shard "
                f"{first} has one, so nothing says it is of the same run (it may be another's, or older than "
                f"records); run it again with the others' options and --resume, which keeps it if it is theirs"
            )
        if record != records[first]:
            ours, theirs = records[first], record
            field = next(key for key in {**ours, **theirs} if ours.get(key) != theirs.get(key))
            raise OutputError(
                f"{out_dir}: shards {first} and {index} come from different runs ({field} {quoted(ours.get(field))} "
                f"against {quoted(theirs.get(field))}); run shard {index} again with the options of the others"
            )
    return records[first]


def check_against_record(record: dict | None, parts: list[Path], labels: list[np.ndarray]) -> None:
    """:class:`OutputError` if the ``parts`` (with their ``labels``) hold another number of digits or other labels
    than their run's record says: a part replaced by hand."""
    if record is None:
        return
    out_dir, total = parts[0].parent, sum(map(len, labels))
    if record.get("count") != total:
        raise OutputError(
            f"{out_dir}: the parts hold {total} digits where their run made {record.get('count')}: "
            "a part was replaced by hand; run it again"
        )
    digits = record.get("digits")
    if not isinstance(digits, list) or not digits or not all(type(d) is int and 0 <= d < MAX_CLASSES for d in digits):
        raise OutputError(f"{out_dir}: the run record names no digits (damaged?); run the shards again")
    start = 0
    for part, part_labels in zip(parts, labels, strict=True):
        if not np.array_equal(part_labels, labels_for(digits, start, start + len(part_labels))):
            raise OutputError(
                f"{part} holds other labels than its run's digits ({','.join(map(str, digits))}): it was "
                "replaced by hand; run its shard again"
            )
        start += len(part_labels)

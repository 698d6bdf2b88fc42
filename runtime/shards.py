"""Split one generation request into K independent parts, and join the parts again.

Shard ``i`` of ``K`` covers global indices ``[i*N//K, (i+1)*N//K)``; noise and labels depend only
on the global index, so the parts, concatenated in order, equal the unsharded output.
"""

from __future__ import annotations

import re
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from digitgen.runtime.encode import open_npz
from digitgen.runtime.errors import InvalidRequestError, OutputError
from digitgen.runtime.idx import IMAGE_SIDE, check_idx, header_size, idx_header
from digitgen.runtime.text import counted, quoted, whole


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (from 0) of a request split into ``count`` parts."""

    index: int = 0
    count: int = 1

    def check(self, total: int) -> Shard:
        """This shard, its numbers as ``int`` (not numpy's), if ``total`` digits can be split so, else
        :class:`InvalidRequestError` in words."""
        for name, value in (("shard index", self.index), ("number of shards", self.count)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidRequestError(f"the {name} must be an integer, got {quoted(value)}")
        index, count = whole(self.index), whole(self.count)
        if self.count < 1:
            raise InvalidRequestError(f"the number of shards must be at least 1, got {count}")
        if not 0 <= self.index < self.count:
            if self.count == 1:
                raise InvalidRequestError(
                    f"shard index {index} needs a number of shards (--num-shards, Shard.count) above it"
                )
            raise InvalidRequestError(f"shard index must be in 0..{whole(self.count - 1)} for {count} shards")
        if self.count > total:
            raise InvalidRequestError(f"{count} shards for {whole(total)} digits would leave some empty")
        return Shard(int(self.index), int(self.count))

    @staticmethod
    def checked(shard: object, total: int) -> Shard:
        """``shard`` checked for ``total`` digits (:meth:`check`), if it is a :class:`Shard` at all."""
        if not isinstance(shard, Shard):
            raise InvalidRequestError(f"shard must be a Shard(index, count), got {shard!r}")
        return shard.check(total)

    def bounds(self, total: int) -> tuple[int, int]:
        """Global ``(start, stop)`` indices of this shard."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    def size(self, total: int) -> int:
        """How many of ``total`` digits this shard holds."""
        start, stop = self.bounds(total)
        return stop - start

    def name(self, file_name: str) -> str:
        """``digits.npz`` -> ``digits-00001-of-00004.npz`` (unchanged for a single shard)."""
        if self.count == 1:
            return file_name
        stem, dot, ext = file_name.partition(".")
        return f"{stem}-{self.index:05d}-of-{self.count:05d}{dot}{ext}"


WHOLE = Shard()
NPZ_ARRAYS = {"images", "labels"}  # what a digits NPZ holds


def rerun_damaged(index: int) -> str:
    """What to do about a damaged part of a sharded run: its shard, resumed, replaces it and keeps the rest; a
    part that no longer even begins as its kind of file (zeros after a crash) only ``--overwrite`` replaces."""
    return f"run shard {index} again with --resume, which replaces a damaged file (--overwrite: whatever it holds)"


MISSING_NAMED = 10  # missing shards named in a refusal; the rest counted


def find_shards(out_dir: Path, file_name: str) -> list[Path]:
    """The complete, ordered set of shard files of ``file_name`` in ``out_dir``."""
    stem, dot, ext = file_name.partition(".")
    pattern = re.compile(rf"{re.escape(stem)}-([0-9]{{5,}})-of-([0-9]{{5,}}){re.escape(dot + ext)}")
    found: dict[int, set[int]] = {}
    for path in sorted(out_dir.iterdir()):
        match = pattern.fullmatch(path.name)
        if match:
            index, count = int(match.group(1)), int(match.group(2))
            _refuse_a_stray_part(path, index, count, file_name)
            found.setdefault(count, set()).add(index)
    if not found:
        raise OutputError(f"no shards of {file_name} in {out_dir}")
    if len(found) > 1:
        runs = ", ".join(f"{counted(len(found[count]), 'part')} of -of-{count:05d}" for count in sorted(found))
        raise OutputError(
            f"{out_dir} holds shards of {file_name} from runs with different shard counts ({runs}); move the parts "
            "of the run that is not this one out of the folder"
        )
    ((count, indices),) = found.items()
    missing = sorted(set(range(count)) - indices)
    if missing:
        named = ", ".join(map(str, missing[:MISSING_NAMED]))
        more = f" and {len(missing) - MISSING_NAMED:,} more" if len(missing) > MISSING_NAMED else ""
        raise OutputError(f"{out_dir}: shard(s) {named}{more} of {count} of {file_name} missing")
    return [out_dir / Shard(i, count).name(file_name) for i in range(count)]


def _refuse_a_stray_part(path: Path, index: int, count: int, file_name: str) -> None:
    """:class:`OutputError` unless ``path`` is named exactly as shard ``index`` of ``count`` of ``file_name`` is
    (a part past the last shard, or written with other digits, would otherwise be left out or read in its place)."""
    if count < 2:
        raise OutputError(
            f"{path.parent}: '-of-{count:05d}' shards are not ones this project writes (one is {file_name})"
        )
    if index >= count:
        raise OutputError(
            f"{path} names shard {index} of a run of {count} shards, which has no such shard; move it out of the folder"
        )
    expected = Shard(index, count).name(file_name)
    if path.name != expected:
        raise OutputError(
            f"{path} is not named as this project names a shard (shard {index} of {count} is {expected}); "
            "move it out of the folder"
        )


def idx_counts(parts: list[Path], images: bool) -> list[int]:
    """The item count of each IDX part, its header and size checked (:func:`~digitgen.runtime.idx.check_idx`);
    a damaged part is named with what to do."""
    counts = []
    for index, part in enumerate(parts):
        try:
            counts.append(check_idx(part, images=images)[0])
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{exc}; {rerun_damaged(index)}") from None
    return counts


def concat_idx(parts: list[Path], counts: list[int], images: bool, out: BinaryIO) -> None:
    """Write to ``out`` one IDX file holding every part's items (images or labels) in order; ``counts`` are the
    parts' item counts, as :func:`~digitgen.runtime.idx.check_idx` read them from their headers."""
    out.write(idx_header(sum(counts), images))
    for part in parts:
        with part.open("rb") as f:
            f.seek(header_size(images))
            shutil.copyfileobj(f, out, 1 << 20)


def concat_npz(parts: list[Path]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Every part's images and labels, in order, and each part's labels; :class:`OutputError` naming a part that
    is not a digits NPZ."""
    arrays: dict[str, list[np.ndarray]] = {"images": [], "labels": []}
    for index, part in enumerate(parts):
        try:
            with open_npz(part) as archive:
                images, labels, others = archive["images"], archive["labels"], sorted(set(archive.files) - NPZ_ARRAYS)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise OutputError(
                f"{part} is not a digits NPZ shard ({type(exc).__name__}: {exc}); {rerun_damaged(index)}"
            ) from None
        if others:  # the merged file would drop them
            raise OutputError(
                f"{part} is not a digits NPZ shard: it holds {', '.join(others)} beside images and labels"
            )
        if not _is_digits(images, labels):
            raise OutputError(
                f"{part} is not a digits NPZ shard: images {images.dtype} {list(images.shape)} and labels "
                f"{labels.dtype} {list(labels.shape)}, not uint8 [N, 28, 28] and int64 [N]"
            )
        arrays["images"].append(images)
        arrays["labels"].append(labels)
    check_shard_sizes(parts, [len(labels) for labels in arrays["labels"]])
    return {key: np.concatenate(chunks) for key, chunks in arrays.items()}, arrays["labels"]


def check_shard_sizes(parts: list[Path], sizes: list[int]) -> None:
    """:class:`OutputError` unless ``sizes`` (digits in each of ``parts``) are how one run splits their sum."""
    total = sum(sizes)
    expected = [Shard(index, len(sizes)).size(total) for index in range(len(sizes))]
    if sizes != expected:
        raise OutputError(
            f"{parts[0].parent}: the shards hold {', '.join(map(str, sizes))} digits, where one run of {total} "
            f"splits as {', '.join(map(str, expected))}: they come from different runs"
        )


def _is_digits(images: np.ndarray, labels: np.ndarray) -> bool:
    """What ``generate --format npz`` writes: uint8 images (N, 28, 28) and int64 labels (N,)."""
    return (
        images.dtype == np.uint8
        and images.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE)
        and labels.dtype == np.int64
        and labels.shape == images.shape[:1]
    )

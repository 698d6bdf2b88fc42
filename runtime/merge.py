"""Join the shard files of a sharded ``generate`` (IDX or NPZ) into the files one unsharded run writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from digitgen.runtime.encode import npz_bytes
from digitgen.runtime.errors import InvalidRequestError, OutputError
from digitgen.runtime.files import atomic_file, atomic_files, readable_file, refuse_existing
from digitgen.runtime.generator import check_flag, check_path
from digitgen.runtime.idx import read_idx
from digitgen.runtime.layout import holds_pngs, output_names
from digitgen.runtime.run_record import check_against_record, common_record, record_paths
from digitgen.runtime.shards import check_shard_sizes, concat_idx, concat_npz, find_shards, idx_counts


def merge_shards(out_dir: str | Path, fmt: str, *, overwrite: bool = False) -> list[Path]:
    """Join the shard files of ``fmt`` ("idx" or "npz") in ``out_dir`` into the unsharded files."""
    check_flag(overwrite, "overwrite")
    out_dir = check_path(out_dir, "the shards' directory")
    if fmt not in ("idx", "npz"):
        raise InvalidRequestError(f"merge joins idx or npz shards, not {fmt!r}")
    try:
        is_folder = stat.S_ISDIR(out_dir.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_folder = False
    except OSError as exc:  # a name too long, a loop of links, a folder that cannot be searched
        raise OutputError(f"cannot read {out_dir}: {exc.strerror or exc}") from exc
    if not is_folder:
        raise OutputError(f"{out_dir} is not a directory")
    targets = [out_dir / name for name in output_names(fmt)]
    other = "npz" if fmt == "idx" else "idx"
    if not any(out_dir.glob(f"{Path(output_names(fmt)[0]).stem}-*-of-*")) and any(
        out_dir.glob(f"{Path(output_names(other)[0]).stem}-*-of-*")
    ):
        raise OutputError(f"{out_dir} holds {other} shards and no {fmt} ones: merge them as {other} (--format {other})")
    if not any(out_dir.glob(f"{Path(output_names(fmt)[0]).stem}-*-of-*")) and holds_pngs(out_dir):
        raise OutputError(
            f"{out_dir} holds PNG digits and no {fmt} shards: a sharded PNG run writes each digit under its final "
            "name, so its folder needs no merge"
        )
    parts = [find_shards(out_dir, path.name) for path in targets]
    every_part = [part for kind in parts for part in kind]
    watched = every_part + record_paths(out_dir, fmt, len(parts[0]))
    before = [_identity(path) for path in watched]  # before anything is read: what is merged is what is there now
    replaceable = refuse_existing(targets, overwrite)
    for part in every_part:
        if not readable_file(part):
            raise OutputError(f"{part} is not a file merge can read (a folder, a pipe, a device, or a link to one)")
    record = common_record(out_dir, fmt, len(parts[0]))
    if fmt == "npz":
        merged, labels = concat_npz(parts[0])
        check_against_record(record, parts[0], labels)
        with atomic_file(targets[0], replaceable=replaceable) as f:
            f.write(npz_bytes(merged["images"], merged["labels"]))
            _refuse_changes(watched, before)
        return targets
    if len(parts[0]) != len(parts[1]):
        raise OutputError(f"{out_dir} holds {len(parts[0])} image shards but {len(parts[1])} label shards")
    image_counts, label_counts = idx_counts(parts[0], images=True), idx_counts(parts[1], images=False)
    uneven = [
        str(i)
        for i, (n_images, n_labels) in enumerate(zip(image_counts, label_counts, strict=True))
        if n_images != n_labels
    ]
    if uneven:
        raise OutputError(f"{out_dir}: shard(s) {', '.join(uneven)} hold different numbers of images and labels")
    check_shard_sizes(parts[1], label_counts)
    check_against_record(record, parts[1], [read_idx(part, images=False) for part in parts[1]])
    with atomic_files(targets, replaceable=replaceable) as (images_out, labels_out):  # both files, or neither
        concat_idx(parts[0], image_counts, True, images_out)
        concat_idx(parts[1], label_counts, False, labels_out)
        _refuse_changes(watched, before)
    return targets


def _identity(path: Path) -> tuple[int, ...] | None:
    """What tells one state of the file ``path`` from another: its inode (a file renamed onto its name is
    another), size and modification time; ``None`` where there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _refuse_changes(paths: list[Path], before: list[tuple[int, ...] | None]) -> None:
    """:class:`OutputError` (before the merged files are published) if any of ``paths`` changed since ``before``
    was taken: a shard run again while merge read the parts would have mixed two runs, or cut one short."""
    for path, identity in zip(paths, before, strict=True):
        if _identity(path) != identity:
            raise OutputError(
                f"{path} changed while merge read the shards (a shard run again meanwhile?); no file was merged: "
                "run merge again once every shard is done"
            )

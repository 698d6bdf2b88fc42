"""What ``--resume`` does with a file already under an output's name: keeps one that holds exactly what the run
writes, replaces a damaged one, and refuses a whole file of other digits (another run's) or one that is no file
of its kind, so that a mistyped option never turns a resume into an overwrite. With ``--overwrite`` too (an
interrupted overwrite, continued), every file that is not exactly the run's is replaced."""

from __future__ import annotations

import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from digitgen.runtime.encode import PNG_SIGNATURE, ZIP_SIGNATURE, is_whole_png, read_npy_header
from digitgen.runtime.errors import OtherRunError
from digitgen.runtime.files import readable_file
from digitgen.runtime.generator import GeneratedDigits
from digitgen.runtime.idx import IMAGE_SIDE, IMAGES_MAGIC, LABELS_MAGIC, header_size, idx_header, is_whole_idx
from digitgen.runtime.layout import pngs_in_range
from digitgen.runtime.run_record import is_record_file, is_whole_record
from digitgen.runtime.text import counted

# What reading a damaged or foreign IDX or NPZ file can raise: a missing member (KeyError), a header that is no
# .npy one (ValueError), a member zipfile cannot decompress (NotImplementedError, RuntimeError)
UNREADABLE = (
    OSError,
    EOFError,
    KeyError,
    ValueError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    RuntimeError,
)


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole file of its format (PNG, NPZ or IDX) rather than a damaged or truncated one,
    whatever it holds (another shape, type or pickled objects: a whole file a run did not leave). An NPZ is whole
    when each member reads back with its CRC; an IDX file has no checksum: only its header and size can tell."""
    try:
        if is_record_file(path):
            return is_whole_record(path.read_bytes())
        if path.suffix == ".png":
            return is_whole_png(path.read_bytes())
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                try:
                    return archive.testzip() is None
                except (NotImplementedError, RuntimeError):  # encrypted, or compressed as zipfile cannot read
                    return True  # someone's whole archive
        return is_whole_idx(path)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error):
        return False


def holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a file holding exactly ``data`` (a dangling link, a folder or a pipe holds nothing)."""
    if not readable_file(path):
        return False
    try:
        with path.open("rb") as f:
            return f.read(len(data) + 1) == data  # a larger file is not read to its end
    except OSError:
        return False


def _npz_headers(count: int) -> dict[str, tuple[tuple[int, ...], bool, np.dtype]]:
    """The ``.npy`` headers (shape, Fortran order, type) of an NPZ file of ``count`` digits as a run writes it."""
    return {
        "images.npy": ((count, IMAGE_SIDE, IMAGE_SIDE), False, np.dtype(np.uint8)),
        "labels.npy": ((count,), False, np.dtype(np.int64)),
    }


def _npy_begins_with(archive: zipfile.ZipFile, name: str, count: int, first: np.ndarray) -> bool:
    """Whether the archive's ``name`` holds ``count`` items as a run writes them, ``first`` the first."""
    with archive.open(name) as f:
        declared = read_npy_header(f)
        data = first.tobytes()
        return declared == _npz_headers(count)[name] and f.read(len(data)) == data


def begins_with(path: Path, count: int, first: GeneratedDigits) -> bool:
    """Whether the IDX or NPZ file ``path`` says it holds ``count`` digits and begins with the digit ``first``, as a
    run of those digits would write it: a cheap look at a few bytes, never at the whole file."""
    if not readable_file(path):
        return False
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                return _npy_begins_with(archive, "images.npy", count, first.images) and _npy_begins_with(
                    archive, "labels.npy", count, first.labels
                )
        images = _holds_images(path)
        data = idx_header(count, images) + (first.images if images else first.labels).astype(np.uint8).tobytes()
        with path.open("rb") as f:
            return f.read(len(data)) == data
    except UNREADABLE:
        return False  # no file of its kind, or not read: refuse_other_digits says which


def _holds_images(path: Path) -> bool:
    """Whether the IDX file ``path`` names is one of images (``*-images-idx3-ubyte``), not of labels."""
    return "-idx3-" in path.name


def _first_bytes(path: Path) -> tuple[str, bytes]:
    """The kind of file ``path`` names and the bytes every file of that kind begins with."""
    if is_record_file(path):
        return "a run record", b"{"
    if path.suffix == ".png":
        return "a PNG", PNG_SIGNATURE
    if path.suffix == ".npz":
        return "an NPZ", ZIP_SIGNATURE
    return "an IDX", struct.pack(">I", IMAGES_MAGIC if _holds_images(path) else LABELS_MAGIC)


def declared_count(path: Path) -> int | None:
    """How many digits the IDX or NPZ file ``path`` says it holds, where its header is one this tool writes for that
    many (28x28 bytes an image, int64 labels in an NPZ); None for any other file."""
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                with archive.open("labels.npy") as f:
                    labels = read_npy_header(f)
                with archive.open("images.npy") as f:
                    images = read_npy_header(f)
            count = labels[0][0] if len(labels[0]) == 1 else -1
            ours = _npz_headers(count)
            return count if (labels, images) == (ours["labels.npy"], ours["images.npy"]) else None
        images = _holds_images(path)
        with path.open("rb") as f:
            header = f.read(header_size(images))
        count = struct.unpack(">I", header[4:8])[0] if len(header) == header_size(images) else -1
        return count if count >= 0 and header == idx_header(count, images) else None
    except UNREADABLE:
        return None


def refuse_other_digits(path: Path, count: int | None = None) -> None:
    """Refuse to let ``resume`` replace ``path`` if it is complete (it then holds another run's digits; named by
    their number where it is not the ``count`` this run writes there) or does not begin as a file of its kind (then
    no run of this tool wrote it). A damaged or cut-short file is replaced."""
    if not readable_file(path):  # a pipe, a device, a dangling link: nothing in it to keep, and never read
        return
    if is_complete(path):
        declared = None if count is None else declared_count(path)
        other = (
            f"{counted(declared, 'digit')} where this command writes {count:,}"
            if declared is not None and declared != count
            else "other digits than this command makes (written with other options or another model)"
        )
        raise OtherRunError(
            f"{path} holds {other}; resume with the options of the run that wrote it, or pass --overwrite to replace it"
        )
    kind, first = _first_bytes(path)
    try:
        with path.open("rb") as f:
            begins = f.read(len(first))
    except OSError:
        return
    if not first.startswith(begins):
        raise OtherRunError(
            f"{path} is not {kind} file, so no run of this command wrote it; move it, or pass --overwrite to replace it"
        )


def _replace_it(path: Path) -> None:
    """Let ``path`` be replaced, whatever it holds (``--overwrite`` gave permission)."""


def resume_check(resume: bool, overwrite: bool = False) -> Callable[[Path], None] | None:
    """What :func:`~digitgen.runtime.files.atomic_files` is given to keep (any run that resumes) and vet (one that
    does not overwrite) the existing files that differ from what the run writes."""
    if not resume:
        return None
    return _replace_it if overwrite else refuse_other_digits


def refuse_a_longer_run(out_dir: Path, total: int) -> None:
    """Refuse to resume a PNG run of ``total`` digits in a folder holding digits past it: they are a longer run's,
    and the folder could never end as this run's would."""
    beyond = pngs_in_range(out_dir, total, sys.maxsize)
    if beyond:
        more = f" (and {len(beyond) - 1} more)" if len(beyond) > 1 else ""
        raise OtherRunError(
            f"{beyond[0]}{more} lies past this command's {total} digits: the folder holds a run of another count; "
            "resume with that run's count, pass --overwrite to replace it, or write to another folder"
        )

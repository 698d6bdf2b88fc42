"""The MNIST IDX format in one place: headers, validation, reading and writing (numpy only).

An IDX file is a big-endian header (magic, count, and for images rows and cols) followed by one
uint8 per pixel or label.
"""

from __future__ import annotations

import shlex
import struct
from pathlib import Path

import numpy as np

from digitgen.runtime.errors import InvalidRequestError
from digitgen.runtime.text import whole

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IMAGE_SIDE = 28
IDX_MAX_ITEMS = 2**32 - 1  # the count field of an IDX header is an unsigned 32-bit integer
MNIST_RAW = "MNIST/raw"  # where torchvision.datasets.MNIST(root) reads the four IDX files
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def header_size(images: bool) -> int:
    """Bytes before the items: magic, count, and for images rows and columns."""
    return 16 if images else 8


# bytes per item of each IDX data type (the magic's third byte): unsigned and signed bytes, short, int, float, double
_IDX_TYPE_SIZES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}


def is_whole_idx(path: Path) -> bool:
    """Whether ``path`` is an IDX file of any type and shape (not only MNIST's) exactly as long as its header says:
    whole, whatever it holds, rather than cut short. ``OSError`` if it cannot be read."""
    with path.open("rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPE_SIZES or magic[3] == 0:
            return False
        dims = f.read(4 * magic[3])
    if len(dims) < 4 * magic[3]:
        return False
    items = int(np.prod(struct.unpack(f">{magic[3]}I", dims), dtype=object))
    return path.stat().st_size == 4 + len(dims) + items * _IDX_TYPE_SIZES[magic[2]]


def check_idx_count(count: int) -> None:
    """Refuse ``count`` digits in one IDX file if its 32-bit count field cannot hold the number."""
    if count > IDX_MAX_ITEMS:
        raise InvalidRequestError(
            f"an IDX file holds at most {IDX_MAX_ITEMS:,} digits (its count is 32 bits), "
            f"not {whole(count, separated=True)}"
        )


def idx_header(count: int, images: bool) -> bytes:
    """The header of an IDX file holding ``count`` 28x28 images, or ``count`` labels."""
    check_idx_count(count)
    if images:
        return struct.pack(">IIII", IMAGES_MAGIC, count, IMAGE_SIDE, IMAGE_SIDE)
    return struct.pack(">II", LABELS_MAGIC, count)


def check_idx(path: str | Path, images: bool | None = None) -> tuple[int, ...]:
    """Shape of the items in ``path`` (``(N, 28, 28)`` or ``(N,)``) after checking its header and size.

    ``images`` says which kind is expected (``None``: either). Reads the header only.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"IDX file not found: {path}")
    with path.open("rb") as f:
        header = f.read(16)
    magic, count = struct.unpack(">II", header[:8]) if len(header) >= 8 else (0, 0)
    is_images = magic == IMAGES_MAGIC and len(header) == 16
    if not (is_images or magic == LABELS_MAGIC) or (images is not None and images != is_images):
        kind = "" if images is None else (" of images" if images else " of labels")
        raise InvalidRequestError(f"{path} is not an MNIST IDX file{kind} (truncated header or magic {magic:#010x})")
    shape: tuple[int, ...] = (count,)
    if is_images:
        rows, cols = struct.unpack(">II", header[8:16])
        if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
            raise InvalidRequestError(f"{path}: images are {rows}x{cols}, expected 28x28")
        shape = (count, rows, cols)
    expected = header_size(is_images) + int(np.prod(shape))
    if path.stat().st_size != expected:
        raise InvalidRequestError(
            f"{path} is truncated or corrupt ({path.stat().st_size} bytes, expected {expected} for {count} items)"
        )
    return shape


def read_idx(path: str | Path, images: bool | None = None) -> np.ndarray:
    """uint8 images (N, 28, 28) or labels (N,), checked against the header's count (and kind: see
    :func:`check_idx`)."""
    shape = check_idx(path, images)
    return np.fromfile(path, np.uint8, offset=header_size(len(shape) == 3)).reshape(shape)


def mnist_raw_folder(root: str | Path) -> Path:
    """Where a torchvision MNIST root keeps the uncompressed IDX files."""
    return Path(root) / MNIST_RAW


def missing_mnist_files(root: str | Path) -> list[str]:
    """The names of :data:`MNIST_FILES` absent from ``root``'s ``MNIST/raw/``."""
    return [name for name in MNIST_FILES if not (mnist_raw_folder(root) / name).is_file()]


def _holds_all(folder: Path) -> bool:
    return all((folder / name).is_file() for name in MNIST_FILES)


def mnist_hint(root: str | Path) -> str:
    """A hint when ``root`` holds the files compressed or is one level off (naming the MNIST root nearby), or an
    empty string.

    Recognised: ``root``'s raw folder holds the missing files as ``.gz``; ``root`` is itself the raw folder or the
    ``MNIST`` folder, or a folder one level below ``root`` is a complete MNIST root.
    """
    root = Path(root)
    raw = mnist_raw_folder(root)
    packed = [f"{name}.gz" for name in MNIST_FILES if not (raw / name).is_file() and (raw / f"{name}.gz").is_file()]
    if packed:
        return f"{raw}/ holds {', '.join(packed)}, compressed: unpack them there (gunzip -k {raw}/*.gz)"
    if _holds_all(root):
        if root.name == "raw" and root.parent.name == "MNIST":
            return f"{root} is the raw folder itself: use --data-dir {root.parent.parent}"
        return f"{root} holds the four files itself; move them into {mnist_raw_folder(root)}/"
    if _holds_all(root / "raw"):
        return f"{root} is the MNIST folder itself: use --data-dir {root.parent}"
    try:
        children = sorted(child for child in root.iterdir() if child.is_dir())
    except OSError:
        return ""
    found = [child for child in children if _holds_all(mnist_raw_folder(child))]
    if found:
        return f"{mnist_raw_folder(found[0])}/ has them: use --data-dir {found[0]}"
    return ""


DEFAULT_MNIST_ROOT = "data"  # --data-dir's default: the torchvision root that holds MNIST/raw/


def data_dir_again(data_dir: str) -> str:
    """`` --data-dir DIR`` for a hint to rerun a command, unless DIR is the default (a resume does not keep it)."""
    return "" if data_dir == DEFAULT_MNIST_ROOT else f" --data-dir {shlex.quote(data_dir)}"


WHERE_ELSE = "point --data-dir (or MNIST_ROOT) at the folder that holds MNIST/raw/"  # where no hint names one


def mnist_not_found_message(root: str | Path) -> str:
    """One line: the four files, where they were looked for, and the likely right root when one is near."""
    raw = mnist_raw_folder(root)
    absent = [name for name in MNIST_FILES if not (raw / name).exists()]
    not_files = [name for name in MNIST_FILES if name not in absent and not (raw / name).is_file()]  # a folder
    found = (("missing", absent), ("not files", not_files))
    problems = [f"{what}: {', '.join(names)}" for what, names in found if names]
    which = "" if len(absent) == len(MNIST_FILES) else f" ({'; '.join(problems)})"
    hint = mnist_hint(root)
    return (
        f"MNIST not found: the four uncompressed IDX files {', '.join(MNIST_FILES)} are looked for in "
        f"{mnist_raw_folder(root)}/{which}" + (f"; {hint}" if hint else "")
    )


def read_mnist_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``split`` ("train" or "t10k") from a torchvision root holding MNIST/raw/."""
    raw = mnist_raw_folder(root)
    if not all((raw / f"{split}-{kind}").is_file() for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")):
        raise InvalidRequestError(mnist_not_found_message(root) + ("" if mnist_hint(root) else f"; {WHERE_ELSE}"))
    images = read_idx(raw / f"{split}-images-idx3-ubyte", images=True)
    labels = read_idx(raw / f"{split}-labels-idx1-ubyte", images=False).astype(np.int64)
    if len(images) != len(labels):
        raise InvalidRequestError(f"{raw}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels

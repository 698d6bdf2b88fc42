"""The MNIST IDX format in one place: headers, validation, reading and writing (numpy only).

An IDX file is a big-endian header (magic, count, and for images rows and cols) followed by one
uint8 per pixel or label.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from digitgen.runtime.errors import InvalidRequestError
from digitgen.runtime.files import atomic_file

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
IMAGE_SIDE = 28


def header_size(images: bool) -> int:
    return 16 if images else 8


def idx_header(count: int, images: bool) -> bytes:
    """The header of an IDX file holding ``count`` 28x28 images, or ``count`` labels."""
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


def read_idx(path: str | Path) -> np.ndarray:
    """uint8 images (N, 28, 28) or labels (N,), checked against the header's count."""
    shape = check_idx(path)
    return np.fromfile(path, np.uint8, offset=header_size(len(shape) == 3)).reshape(shape)


def write_idx(path: str | Path, items: np.ndarray) -> None:
    """Write uint8 images (N, 28, 28) or labels (N,) as one IDX file, atomically."""
    with atomic_file(path) as f:
        f.write(idx_header(len(items), items.ndim == 3) + items.astype(np.uint8).tobytes())


def read_mnist_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``split`` ("train" or "t10k") from a torchvision root holding MNIST/raw/."""
    raw = Path(root) / "MNIST" / "raw"
    images = read_idx(raw / f"{split}-images-idx3-ubyte")
    labels = read_idx(raw / f"{split}-labels-idx1-ubyte").astype(np.int64)
    if len(images) != len(labels):
        raise InvalidRequestError(f"{raw}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels

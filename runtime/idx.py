"""Read MNIST IDX files with numpy (the runtime's evaluator reads the test set without torch)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from digitgen.runtime.errors import InvalidRequestError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_idx(path: str | Path) -> np.ndarray:
    """uint8 images (N, 28, 28) or labels (N,), checked against the header's count."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"IDX file not found: {path}")
    data = path.read_bytes()
    magic, count = struct.unpack(">II", data[:8]) if len(data) >= 8 else (0, 0)
    if magic == IMAGES_MAGIC and len(data) >= 16:
        rows, cols = struct.unpack(">II", data[8:16])
        shape, offset = (count, rows, cols), 16
    elif magic == LABELS_MAGIC:
        shape, offset = (count,), 8
    else:
        raise InvalidRequestError(f"{path} is not an MNIST IDX file")
    if len(data) != offset + int(np.prod(shape)):
        raise InvalidRequestError(f"{path} is truncated or corrupt ({len(data)} bytes for {count} items)")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def read_mnist_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``split`` ("train" or "t10k") from a torchvision root holding MNIST/raw/."""
    raw = Path(root) / "MNIST" / "raw"
    images = read_idx(raw / f"{split}-images-idx3-ubyte")
    labels = read_idx(raw / f"{split}-labels-idx1-ubyte").astype(np.int64)
    if len(images) != len(labels):
        raise InvalidRequestError(f"{raw}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels

"""MNIST as two in-memory tensors, read with torchvision from its standard root layout."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import torch

from digitgen.training.errors import DatasetCorruptError, DatasetNotFoundError

IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class MnistTensors(NamedTuple):
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64


def raw_folder(root: str | Path) -> Path:
    """Where torchvision keeps the uncompressed IDX files under ``root``."""
    return Path(root) / "MNIST" / "raw"


def check_idx_file(path: Path) -> None:
    """Raise :class:`DatasetCorruptError` unless ``path`` is a complete MNIST IDX file."""
    is_images = "images" in path.name
    header_size = 16 if is_images else 8
    with path.open("rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        raise DatasetCorruptError(f"{path}: truncated IDX header ({len(header)} bytes)")
    magic, count = struct.unpack(">II", header[:8])
    expected_magic = IMAGE_MAGIC if is_images else LABEL_MAGIC
    if magic != expected_magic:
        raise DatasetCorruptError(f"{path}: not an MNIST IDX file (magic {magic:#010x})")
    item_size = 1
    if is_images:
        rows, cols = struct.unpack(">II", header[8:16])
        if (rows, cols) != (28, 28):
            raise DatasetCorruptError(f"{path}: images are {rows}x{cols}, expected 28x28")
        item_size = rows * cols
    expected = header_size + count * item_size
    actual = path.stat().st_size
    if actual != expected:
        raise DatasetCorruptError(
            f"{path}: {actual} bytes, expected {expected} for {count} items (truncated or corrupt)"
        )


def _missing_files(root: Path) -> list[str]:
    return [name for name in MNIST_FILES if not (raw_folder(root) / name).is_file()]


def _try_download(root: Path) -> str:
    """Download MNIST with torchvision; return an empty string or why it failed."""
    from torchvision.datasets import MNIST

    try:
        MNIST(str(root), train=True, download=True)
    except (OSError, RuntimeError) as exc:
        return f"download failed: {exc}"
    return ""


def load_mnist(root: str | Path, *, train: bool = True, download: bool = True) -> MnistTensors:
    """Load the MNIST train (or test) split as uint8 images and int64 labels.

    ``root`` is the torchvision root (it holds ``MNIST/raw/``). Missing files are downloaded
    when ``download`` is true and the network allows.
    """
    from torchvision.datasets import MNIST

    root = Path(root)
    reason = ""
    if _missing_files(root) and download:
        reason = _try_download(root)
    missing = _missing_files(root)
    if missing:
        hint = f" ({reason})" if reason else ""
        raise DatasetNotFoundError(
            f"MNIST not found: put the four uncompressed IDX files {', '.join(MNIST_FILES)} "
            f"in {raw_folder(root)}/ (missing: {', '.join(missing)}){hint}"
        )
    split = MNIST_FILES[:2] if train else MNIST_FILES[2:]
    for name in split:
        check_idx_file(raw_folder(root) / name)
    dataset = MNIST(str(root), train=train, download=False)
    return MnistTensors(dataset.data.contiguous(), dataset.targets.long())

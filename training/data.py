"""MNIST as two in-memory tensors, read with torchvision from its standard root layout."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from digitgen.runtime.errors import InvalidRequestError
from digitgen.runtime.idx import check_idx
from digitgen.training.errors import DatasetCorruptError, DatasetNotFoundError

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
    try:
        check_idx(path, images="images" in path.name)
    except InvalidRequestError as exc:
        raise DatasetCorruptError(str(exc)) from exc


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

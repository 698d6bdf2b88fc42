"""MNIST as two in-memory tensors, read from torchvision's standard root layout (torchvision downloads it)."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path
from typing import NamedTuple

import torch

from digitgen.runtime.errors import InvalidRequestError
from digitgen.runtime.files import remove_if_empty
from digitgen.runtime.idx import (
    WHERE_ELSE,
    missing_mnist_files,
    mnist_hint,
    mnist_not_found_message,
    mnist_raw_folder,
    read_mnist_split,
)
from digitgen.runtime.text import counted
from digitgen.training.distributed import DistContext, on_main_first
from digitgen.training.errors import DatasetCorruptError, DatasetNotFoundError

__all__ = ["MnistTensors", "check_labels", "load_mnist", "load_mnist_once"]


class MnistTensors(NamedTuple):
    """One MNIST split as tensors."""

    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64

    def sha256(self) -> str:
        """A fingerprint of the images and their labels, in order: the same data gives the same one on any machine."""
        digest = hashlib.sha256(self.images.cpu().numpy().tobytes())
        digest.update(self.labels.cpu().numpy().astype("<i8").tobytes())
        return digest.hexdigest()


def _try_download(root: Path) -> str:
    """Download MNIST with torchvision into ``root``; return an empty string or why it failed.

    torchvision's own lines (each URL it tries) are kept out of the output: a failure is one reason, and leaves
    none of the folders torchvision made for it, if they are still empty.
    """
    from torchvision.datasets import MNIST

    raw = mnist_raw_folder(root)
    made = [folder for folder in (raw, raw.parent, root) if not folder.exists()]  # deepest first
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            MNIST(str(root), train=True, download=True)
    except (OSError, RuntimeError) as exc:
        remove_if_empty(made)
        return f"download failed: {' '.join(str(exc).split())}"
    return ""


def load_mnist(root: str | Path, *, train: bool = True, download: bool = False) -> MnistTensors:
    """Load the MNIST train (or test) split as uint8 images and int64 labels.

    ``root`` is the torchvision root (it holds ``MNIST/raw/``). Missing files are downloaded only
    when ``download`` is true; otherwise nothing is created, and the error names the four files,
    where they were looked for, and the likely right root when one is one level off.
    """
    root = Path(root)
    reason = ""
    missing = missing_mnist_files(root)
    if missing and download:
        reason = _try_download(root)
        missing = missing_mnist_files(root)
    if missing:
        message = mnist_not_found_message(root)
        if reason:
            message += f" ({reason})"
        elif not download and not mnist_hint(root):
            message += f"; {WHERE_ELSE}, or pass --download"
        raise DatasetNotFoundError(message)
    try:
        images, labels = read_mnist_split(root, "train" if train else "t10k")
    except InvalidRequestError as exc:  # a damaged file, or a split whose two files disagree
        raise DatasetCorruptError(str(exc)) from exc
    return MnistTensors(torch.from_numpy(images), torch.from_numpy(labels))


def check_labels(data: MnistTensors, num_classes: int, where: str) -> None:
    """Refuse a split of no images, and labels outside ``0 .. num_classes - 1`` (an IDX label is any byte), naming
    the first: one would stop training with an index error, or only at the batch that draws it."""
    if not len(data.labels):
        raise DatasetCorruptError(f"{where} holds no images")
    bad = torch.nonzero((data.labels < 0) | (data.labels >= num_classes))
    if len(bad):
        index = int(bad[0])
        raise DatasetCorruptError(
            f"{where}: item {index} is labelled {int(data.labels[index])}, not a class 0-{num_classes - 1} "
            f"of this model ({counted(len(bad), 'such label')})"
        )


def load_mnist_once(root: str | Path, download: bool, ctx: DistContext, device: torch.device) -> MnistTensors:
    """:func:`load_mnist` of the train split on every process of a run, with any download made by the first
    process alone while the others wait: processes downloading into one folder at once could read each
    other's half-written files. If the first process fails, all fail (it with its reason)."""
    failed = "the first process could not load MNIST (its error says why)"
    data = on_main_first(ctx, device, lambda: load_mnist(root, download=download), failed)  # also the others' wait
    return data if data is not None else load_mnist(root)

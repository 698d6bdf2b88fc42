"""Typed errors of the training package; the CLI turns them into one-line messages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class TrainingError(Exception):
    """Base class of every error the training package raises on purpose."""


class DatasetNotFoundError(TrainingError, FileNotFoundError):
    """MNIST files are missing and could not be downloaded."""


class DatasetCorruptError(TrainingError, ValueError):
    """An MNIST IDX file exists but its header or size is wrong."""


class CheckpointError(TrainingError, ValueError):
    """A checkpoint is unreadable, not ours, or from an incompatible configuration."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """A loss became NaN or infinite; training stops before the bad update is applied."""


class RunDirectoryError(TrainingError, FileExistsError):
    """The run directory cannot take this run: it holds another one (and neither --resume nor --overwrite was
    given), is not a folder, or a run is still training there."""


class TrainingMemoryError(TrainingError, MemoryError):
    """PyTorch could not allocate the memory a training step needs."""


@contextmanager
def memory_errors_in_words(message: str) -> Iterator[None]:
    """PyTorch's allocator failing (a ``RuntimeError`` on the CPU, ``torch.OutOfMemoryError`` on CUDA) as a
    :class:`TrainingMemoryError` in ``message``, which says what did not fit and what to do."""
    try:
        yield
    except RuntimeError as exc:
        import torch  # here: the CLI imports this module where torch is not installed

        if not (isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)):
            raise
        raise TrainingMemoryError(message) from exc

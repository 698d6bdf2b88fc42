"""Typed errors of the training package; the CLI turns them into one-line messages."""


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

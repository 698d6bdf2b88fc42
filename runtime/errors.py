"""Typed errors of the runtime; each subclasses the built-in that fits so callers can catch either."""


class DigitgenError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ModelNotFoundError(DigitgenError, FileNotFoundError):
    """The model path does not exist."""


class InvalidModelError(DigitgenError, ValueError):
    """The file is not a loadable ONNX model (wrong format, truncated, corrupt)."""


class ModelContractError(DigitgenError, ValueError):
    """The ONNX model loads but does not follow the digitgen model contract."""


class ProviderUnavailableError(DigitgenError, ValueError):
    """The requested execution provider cannot run here."""


class InvalidRequestError(DigitgenError, ValueError):
    """Bad generation arguments: counts, digits, seeds, batch sizes or formats."""


class TooManyDigitsError(DigitgenError, MemoryError):
    """More digits asked for at once than memory can hold (a ``MemoryError`` too)."""


class ModelRunError(DigitgenError, RuntimeError):
    """The model passed the contract check but onnxruntime failed to run it."""


class OutputError(DigitgenError, OSError):
    """The output location is unusable, or would overwrite files without permission."""


class OtherRunError(OutputError):
    """``resume`` found a complete file of other digits (another run's), or a file no run wrote: it is not replaced."""

"""Typed errors of the export package."""


class ExportError(Exception):
    """Base class of every error the export package raises on purpose."""


class ExportVerificationError(ExportError, ValueError):
    """The ONNX model's outputs differ from PyTorch's beyond the tolerance, or break the contract."""

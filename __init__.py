"""digitgen: handwritten digits from a GAN trained on MNIST, exported to ONNX, run without PyTorch.

The embedding API (torch-free)::

    from digitgen import DigitGenerator

    batch = DigitGenerator.from_path().generate(16, digits=[4, 2], seed=7)

Layers: :mod:`digitgen.runtime` (numpy + onnxruntime), :mod:`digitgen.training` and
:mod:`digitgen.export` (PyTorch), :mod:`digitgen.cli` (the ``digitgen`` command).
"""

from digitgen.runtime import (
    DigitGenerator,
    DigitgenError,
    GeneratedDigits,
    InvalidModelError,
    InvalidRequestError,
    ModelContractError,
    ModelNotFoundError,
    ModelRunError,
    OtherRunError,
    OutputError,
    ProviderUnavailableError,
    default_model_path,
)
from digitgen.runtime.noise import NOISE_SCHEME

__all__ = [
    "NOISE_SCHEME",
    "DigitGenerator",
    "DigitgenError",
    "GeneratedDigits",
    "InvalidModelError",
    "InvalidRequestError",
    "ModelContractError",
    "ModelNotFoundError",
    "ModelRunError",
    "OtherRunError",
    "OutputError",
    "ProviderUnavailableError",
    "default_model_path",
]

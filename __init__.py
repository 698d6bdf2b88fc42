"""digitgen: handwritten digits from a GAN trained on MNIST, exported to ONNX, run without PyTorch.

The embedding API (torch-free)::

    from digitgen import DigitGenerator

    batch = DigitGenerator.from_path().generate(16, digits=[4, 2], seed=7)

Layers: :mod:`digitgen.runtime` (numpy + onnxruntime), :mod:`digitgen.training` and
:mod:`digitgen.export` (PyTorch), :mod:`digitgen.cli` (the ``digitgen`` command).

The names below load the runtime on first use, so that ``import digitgen`` alone is instant: the
``digitgen`` command starts in this package and takes its stop signals before onnxruntime loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
        TooManyDigitsError,
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
    "TooManyDigitsError",
    "default_model_path",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'digitgen' has no attribute {name!r}")
    module = "digitgen.runtime.noise" if name == "NOISE_SCHEME" else "digitgen.runtime"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

"""digitgen runtime: generate handwritten digits from an ONNX generator, without PyTorch.

The generator, the writers and the evaluator depend on numpy and onnxruntime only (PNG files come from
the runtime's own encoder, on Python's zlib); :mod:`digitgen.runtime.progress`, the CLI's progress lines,
uses click.
"""

from digitgen.runtime.errors import (
    DigitgenError,
    InvalidModelError,
    InvalidRequestError,
    ModelContractError,
    ModelNotFoundError,
    ModelRunError,
    OtherRunError,
    OutputError,
    ProviderUnavailableError,
    TooManyDigitsError,
)
from digitgen.runtime.generator import DigitGenerator, GeneratedDigits, default_model_path
from digitgen.runtime.layout import FORMATS
from digitgen.runtime.shards import Shard
from digitgen.runtime.writers import generate_files, write_digits

__all__ = [
    "FORMATS",
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
    "Shard",
    "TooManyDigitsError",
    "default_model_path",
    "generate_files",
    "write_digits",
]

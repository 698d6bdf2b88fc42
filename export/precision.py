"""Lighter exports: fp16 weights and activations, or int8 by static QDQ quantization.

Both keep the model contract (float32 ``z`` in, float32 ``image`` out): an fp16 graph casts at its
edges, an int8 graph quantizes and dequantizes around each convolution and matrix product with
scales calibrated on generated batches (onnxruntime's dynamic quantization does not cover
ConvTranspose).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static


class HalfPrecision(torch.nn.Module):
    """Runs ``model`` in fp16 behind float32 inputs and outputs (the contract's types)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, z: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        return self.model(z.half(), digit).float()


def _generated_inputs(latent_dim: int, num_classes: int, batches: int, batch_size: int) -> Iterator[dict]:
    """Calibration inputs: seeded standard-normal noise with digits cycling through the classes."""
    rng = np.random.default_rng(0)
    digits = np.arange(batch_size, dtype=np.int64) % num_classes
    for _ in range(batches):
        yield {"z": rng.standard_normal((batch_size, latent_dim), dtype=np.float32), "digit": digits}


class _Calibration(CalibrationDataReader):
    def __init__(self, inputs: Iterator[dict]) -> None:
        self._inputs = inputs

    def get_next(self) -> dict | None:
        return next(self._inputs, None)


def _is_not_preprocessing_advice(record: logging.LogRecord) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """Drop the quantizer's advice to pre-process the model (on Python's root logger): the exporter's graph
    comes optimised and shape-inferred, and the int8 file is verified against PyTorch after."""
    root = logging.getLogger()
    root.addFilter(_is_not_preprocessing_advice)
    try:
        yield
    finally:
        root.removeFilter(_is_not_preprocessing_advice)


def quantize_int8(
    fp32_model: Path, out: Path, latent_dim: int, num_classes: int, batches: int = 16, batch_size: int = 64
) -> None:
    """Write an int8 QDQ version of ``fp32_model`` (per-channel int8 weights, uint8 activations).

    Weights use 7 of their 8 bits (``reduce_range``): on x86 CPUs without VNNI, onnxruntime's u8s8
    kernels add pairs of products in 16 bits, which full-range weights overflow.
    """
    with _quiet_quantizer():
        quantize_static(
            fp32_model,
            out,
            _Calibration(_generated_inputs(latent_dim, num_classes, batches, batch_size)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "ConvTranspose", "Gemm", "MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
        )

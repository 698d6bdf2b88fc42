"""Numerical proof of an export: onnxruntime vs PyTorch on several batch sizes and seeds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.errors import ExportVerificationError
from runtime.contract import check_contract
from runtime.errors import DigitgenError
from runtime.session import open_session

ATOL = 1e-4  # max |torch - onnxruntime| per pixel; pixels lie in [0, 1]
BATCH_SIZES = (1, 7, 64)
SEEDS = (0, 1)


class ContractGenerator(torch.nn.Module):
    """The exported graph: generator plus post-processing, tanh output mapped to [0, 1] pixels."""

    def __init__(self, generator: torch.nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        return (self.generator(z, digit) + 1.0) * 0.5  # (B, 1, 28, 28) in [0, 1]


@dataclass(frozen=True)
class ParityCase:
    batch_size: int
    seed: int
    max_abs_diff: float


@dataclass(frozen=True)
class ParityReport:
    cases: tuple[ParityCase, ...]
    atol: float

    @property
    def passed(self) -> bool:
        return all(case.max_abs_diff <= self.atol for case in self.cases)

    def lines(self) -> list[str]:
        return [
            f"batch {c.batch_size:>3}  seed {c.seed}  max|torch-ort| {c.max_abs_diff:.2e}  "
            f"{'ok' if c.max_abs_diff <= self.atol else 'FAIL'} (atol {self.atol:.0e})"
            for c in self.cases
        ]


def _inputs(batch_size: int, seed: int, latent_dim: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch_size, latent_dim), dtype=np.float32)
    return z, rng.integers(0, num_classes, batch_size, dtype=np.int64)


def verify_parity(onnx_path: str | Path, model: ContractGenerator, atol: float = ATOL) -> ParityReport:
    """Check ``onnx_path`` against ``model``: contract (names, types, shapes), then values.

    Raises :class:`ExportVerificationError` naming every failing case.
    """
    try:
        opened = open_session(onnx_path, "cpu")
        info = check_contract(opened.session, str(onnx_path))
    except DigitgenError as exc:
        raise ExportVerificationError(str(exc)) from exc
    cases = []
    model.eval()
    for batch_size in BATCH_SIZES:
        for seed in SEEDS:
            z, digits = _inputs(batch_size, seed, info.latent_dim, info.num_classes)
            with torch.no_grad():
                expected = model(torch.from_numpy(z), torch.from_numpy(digits)).numpy()
            (actual,) = opened.session.run(["image"], {"z": z, "digit": digits})
            if actual.shape != expected.shape:
                raise ExportVerificationError(f"output shape {actual.shape} differs from PyTorch's {expected.shape}")
            cases.append(ParityCase(batch_size, seed, float(np.max(np.abs(actual - expected)))))
    report = ParityReport(tuple(cases), atol)
    if not report.passed:
        raise ExportVerificationError("ONNX output differs from PyTorch: " + "; ".join(report.lines()))
    return report

"""Numerical proof of an export: onnxruntime vs PyTorch on several batch sizes and seeds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from digitgen.export.errors import ExportVerificationError
from digitgen.export.tolerances import TOLERANCES, Tolerance
from digitgen.runtime.contract import check_contract
from digitgen.runtime.session import ORT_ERRORS, open_session, ort_reason, run_model
from digitgen.runtime.text import MAX_QUOTED, cut
from digitgen.training.config import GANConfig

BATCH_SIZES = (1, 7, 64)
SEEDS = (0, 1)
FAR_OFF = 0.05  # a mean difference 5x int8's tolerance: no export rounds so far; another model is likelier


class ContractGenerator(torch.nn.Module):
    """The exported graph: generator plus post-processing, tanh output mapped to [0, 1] pixels."""

    def __init__(self, generator: torch.nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        return (self.generator(z, digit) + 1.0) * 0.5  # (B, 1, 28, 28) in [0, 1]


@dataclass(frozen=True)
class ParityCase:
    """One batch compared: its size, its noise seed and how far ONNX's pixels are from PyTorch's."""

    batch_size: int
    seed: int
    max_abs_diff: float
    mean_abs_diff: float


@dataclass(frozen=True)
class ParityReport:
    """Every case of a parity check and the tolerance they were held to."""

    cases: tuple[ParityCase, ...]
    tolerance: Tolerance

    def case_passed(self, case: ParityCase) -> bool:
        """Whether ``case`` is within both the per-pixel and the mean tolerance."""
        return case.max_abs_diff <= self.tolerance.max_abs and case.mean_abs_diff <= self.tolerance.mean_abs

    @property
    def passed(self) -> bool:
        """Whether every case is."""
        return all(self.case_passed(case) for case in self.cases)

    def refusal(self, onnx_path: str | Path) -> str:
        """Why ``onnx_path`` fails the check: every case's line; and where every case is far off, past any export's
        rounding, the likelier cause, another model."""
        far_off = all(case.mean_abs_diff > FAR_OFF for case in self.cases)
        hint = (
            f"; every case is off by a mean over {FAR_OFF}, far past any export's rounding: was {onnx_path} "
            "exported from this checkpoint?"
        )
        return "ONNX output differs from PyTorch: " + "; ".join(self.lines()) + (hint if far_off else "")

    def lines(self) -> list[str]:
        """One line a case: its batch, seed, differences and verdict, as ``verify`` prints them."""
        t = self.tolerance
        return [
            f"batch {c.batch_size:>3}  seed {c.seed}  max|torch-ort| {c.max_abs_diff:.2e}  mean {c.mean_abs_diff:.2e}  "
            f"{'ok' if self.case_passed(c) else 'FAIL'} (atol {t.max_abs:.0e}, mean {t.mean_abs:.0e})"
            for c in self.cases
        ]


def _inputs(batch_size: int, seed: int, latent_dim: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch_size, latent_dim), dtype=np.float32)
    return z, rng.integers(0, num_classes, batch_size, dtype=np.int64)


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}


def graph_precision(onnx_path: str | Path) -> str:
    """The precision ``onnx_path``'s graph is built in: int8 where it quantizes, fp16 where it holds half-precision
    weights, else fp32; what its tolerance is chosen by, not the ``precision`` its metadata claims."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    if any(node.op_type in QUANTIZED_OPS for node in model.graph.node):
        return "int8"
    if any(tensor.data_type == onnx.TensorProto.FLOAT16 for tensor in model.graph.initializer):
        return "fp16"
    return "fp32"


def verify_parity(
    onnx_path: str | Path,
    model: ContractGenerator,
    tolerance: Tolerance | None = None,
    atol: float | None = None,
    config: GANConfig | None = None,
    trained: Mapping[str, str] | None = None,
) -> ParityReport:
    """Check ``onnx_path`` against the fp32 ``model``: contract (names, types, shapes), the sizes of
    ``model``'s ``config`` when given, the training summary its metadata records against ``trained`` (the
    checkpoint's, as export writes it) when given, then values.

    The tolerance defaults to that of the precision the graph is built in (:func:`graph_precision`), and
    a ``precision`` of this project's in its metadata that says otherwise is refused; ``atol`` overrides its
    per-pixel maximum. A file that cannot be loaded, or breaks the contract, raises the loader's own typed
    error (:class:`InvalidModelError`, :class:`ModelContractError`); one that runs but differs raises
    :class:`ExportVerificationError` naming every failing case.
    """
    opened = open_session(onnx_path, "cpu")
    info = check_contract(opened.session, str(onnx_path))
    if config is not None and (info.latent_dim, info.num_classes) != (config.latent_dim, config.num_classes):
        raise ExportVerificationError(
            f"{onnx_path} takes {info.latent_dim} noise values and {info.num_classes} digits, the checkpoint's "
            f"generator {config.latent_dim} and {config.num_classes}: it was not exported from this checkpoint"
        )
    other_run = [
        f"{key} {cut(info.metadata[key], MAX_QUOTED)} where the checkpoint's is {value}"
        for key, value in (trained or {}).items()
        if key in info.metadata and info.metadata[key] != value
    ]
    if other_run:  # another run's model may still fall within int8's loose tolerance
        raise ExportVerificationError(
            f"{onnx_path} records {'; '.join(other_run[:3])}: it was not exported from this checkpoint"
        )
    if tolerance is None:
        built, claimed = graph_precision(onnx_path), info.metadata.get("precision")
        if claimed in TOLERANCES and claimed != built:  # a looser tolerance is no file's to claim (another tool's
            # word for its precision, which names none of these, is held to the graph's)
            raise ExportVerificationError(
                f"{onnx_path} says its precision is {claimed!r}, but its graph is {built}: it was not exported so"
            )
        tolerance = TOLERANCES[built]
    if atol is not None:
        tolerance = replace(tolerance, max_abs=atol)
    cases = []
    model.eval()
    for batch_size in BATCH_SIZES:
        for seed in SEEDS:
            z, digits = _inputs(batch_size, seed, info.latent_dim, info.num_classes)
            with torch.no_grad():
                expected = model(torch.from_numpy(z), torch.from_numpy(digits)).numpy()
            try:
                (actual,) = run_model(opened.session, ["image"], {"z": z, "digit": digits})
            except ORT_ERRORS as exc:
                raise ExportVerificationError(
                    f"{onnx_path} failed to run on a batch of {batch_size}: {ort_reason(exc)}"
                ) from exc
            if actual.shape != expected.shape:
                raise ExportVerificationError(f"output shape {actual.shape} differs from PyTorch's {expected.shape}")
            diff = np.abs(actual - expected)
            cases.append(ParityCase(batch_size, seed, float(diff.max()), float(diff.mean())))
    report = ParityReport(tuple(cases), tolerance)
    if not report.passed:
        raise ExportVerificationError(report.refusal(onnx_path))
    return report

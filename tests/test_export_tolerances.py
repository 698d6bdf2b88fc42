"""Export verification's tolerances are the README's, and an error just beyond them is refused;
int8 calibration sees the noise the runtime feeds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import digitgen
import digitgen.export.precision as precision_module
from digitgen.export.errors import ExportVerificationError
from digitgen.export.tolerances import PRECISIONS, TOLERANCES
from digitgen.export.verify import ContractGenerator, ParityCase, ParityReport, verify_parity
from digitgen.runtime.noise import standard_normal
from digitgen.training.state import load_generator
from tests.helpers import assert_int8_qdq

README = Path(digitgen.__file__).resolve().parent / "README.md"


def documented_tolerances() -> dict[str, tuple[float, float]]:
    """``{precision: (max, mean)}`` as the README states them ("fp16: max 2e-2, mean 1e-3")."""
    found: dict[str, tuple[float, float]] = {}
    for name, max_abs, mean_abs in re.findall(r"(fp32|fp16|int8): max ([\d.e-]+), mean ([\d.e-]+)", README.read_text()):
        value = (float(max_abs), float(mean_abs))
        assert found.setdefault(name, value) == value, f"the README gives {name} two tolerances"
    return found


def test_tolerances_are_the_documented_ones() -> None:
    documented = documented_tolerances()
    assert set(documented) == set(PRECISIONS) == {"fp32", "fp16", "int8"}
    for name, (max_abs, mean_abs) in documented.items():
        assert (TOLERANCES[name].max_abs, TOLERANCES[name].mean_abs) == (max_abs, mean_abs), name


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
def test_a_difference_equal_to_the_tolerance_passes(name: str) -> None:
    """A case fails only when a figure exceeds its tolerance."""
    max_abs, mean_abs = documented_tolerances()[name]
    assert ParityReport((ParityCase(7, 0, max_abs, mean_abs),), TOLERANCES[name]).passed
    assert not ParityReport((ParityCase(7, 0, max_abs, mean_abs * 1.01),), TOLERANCES[name]).passed
    assert not ParityReport((ParityCase(7, 0, max_abs * 1.01, mean_abs),), TOLERANCES[name]).passed


class Offset(torch.nn.Module):
    """The reference model with a known error: ``offset`` added to pixel 0 of every image, or to every pixel."""

    def __init__(self, model: torch.nn.Module, offset: float, everywhere: bool) -> None:
        super().__init__()
        self.model, self.offset, self.everywhere = model, offset, everywhere

    def forward(self, z: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        image = self.model(z, digit).clone()
        if self.everywhere:
            return image + self.offset
        image[:, 0, 0, 0] += self.offset
        return image


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("everywhere", [False, True], ids=["one-pixel", "every-pixel"])
def test_an_error_beyond_the_documented_tolerance_is_refused(
    tiny_onnx: Path, tiny_checkpoint: Path, name: str, everywhere: bool
) -> None:
    """One pixel off tests the per-pixel maximum, every pixel off tests the mean (below the maximum); each
    precision's tolerance, as export holds its file to it (verify reads it from the file's graph)."""
    max_abs, mean_abs = documented_tolerances()[name]
    limit = mean_abs if everywhere else max_abs
    generator = ContractGenerator(load_generator(str(tiny_checkpoint))[0])

    assert verify_parity(tiny_onnx, Offset(generator, 0.5 * limit, everywhere), TOLERANCES[name]).passed
    with pytest.raises(ExportVerificationError, match="FAIL"):
        verify_parity(tiny_onnx, Offset(generator, 1.5 * limit, everywhere), TOLERANCES[name])


def test_int8_calibration_sees_standard_normal_noise_and_every_digit(tmp_path: Path, monkeypatch) -> None:
    """The activation ranges come from these inputs: they must be what the runtime feeds the model."""
    seen: list[dict] = []

    def capture(fp32_model, out, reader, **settings) -> None:
        while (batch := reader.get_next()) is not None:
            seen.append(batch)

    monkeypatch.setattr(precision_module, "quantize_static", capture)
    for _ in range(2):
        precision_module.quantize_int8(tmp_path / "in.onnx", tmp_path / "out.onnx", latent_dim=64, num_classes=10)

    first, again = seen[: len(seen) // 2], seen[len(seen) // 2 :]
    z = np.concatenate([b["z"] for b in first])
    digits = np.concatenate([b["digit"] for b in first])
    assert np.array_equal(z, np.concatenate([b["z"] for b in again]))  # a checkpoint gives one int8 model
    calibrated = re.search(r"calibrated on ([\d,]+)", README.read_text())
    assert calibrated and len(z) == len(digits) == int(calibrated.group(1).replace(",", ""))
    assert z.dtype == np.float32 and z.shape[1] == 64 and digits.dtype == np.int64
    assert np.bincount(digits, minlength=10).min() >= 0.8 * len(digits) / 10  # every digit, about as often
    runtime = standard_normal(seed=0, start=0, stop=len(z), size=64)
    assert abs(z.mean()) < 0.05
    assert z.std() == pytest.approx(runtime.std(), rel=0.05)  # standard normal, as the runtime draws
    assert np.abs(z).max() == pytest.approx(np.abs(runtime).max(), rel=0.2)  # the same tails


class WrongDigit(torch.nn.Module):
    """The reference model, but every image of one digit is off by 0.5."""

    def __init__(self, model: torch.nn.Module, digit: int) -> None:
        super().__init__()
        self.model, self.digit = model, digit

    def forward(self, z: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
        return self.model(z, digit) + 0.5 * (digit == self.digit).float()[:, None, None, None]


@pytest.mark.parametrize("digit", [0, 9])
def test_verification_asks_for_every_digit(tiny_onnx: Path, tiny_checkpoint: Path, digit: int) -> None:
    generator = ContractGenerator(load_generator(str(tiny_checkpoint))[0])
    with pytest.raises(ExportVerificationError, match="FAIL"):
        verify_parity(tiny_onnx, WrongDigit(generator, digit))


def test_int8_quantizes_every_weighted_layer_per_channel_with_uint8_activations(
    tmp_path: Path, tiny_onnx: Path
) -> None:
    """The int8 file is the one the README describes: QDQ around every convolution and matrix product,
    int8 weights with a scale per output channel, uint8 activations (see ``quantize_int8``)."""
    out = tmp_path / "int8.onnx"
    precision_module.quantize_int8(tiny_onnx, out, latent_dim=8, num_classes=10, batches=1, batch_size=10)
    assert_int8_qdq(out)

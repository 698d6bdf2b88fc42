"""The runtime and `generate` must work where PyTorch and Pillow (which the runtime does not need) are absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import PIP

BLOCK_TORCH = "import sys; sys.modules['torch'] = sys.modules['torchvision'] = sys.modules['PIL'] = None\n"


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code],
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("module", ["torch", "PIL"])
def test_import_really_fails_in_the_subprocess(tmp_path: Path, module: str) -> None:
    result = _run_python(f"import {module}", tmp_path)
    assert result.returncode != 0 and f"import of {module} halted" in result.stderr


@pytest.mark.parametrize(
    ("fmt", "written"), [("npz", "digits.npz"), ("png", "00000011_label1.png"), ("grid", "grid.png")]
)
def test_cli_generate_without_torch(tmp_path: Path, tiny_onnx: Path, fmt: str, written: str) -> None:
    code = (
        "from digitgen.cli import main\n"
        f"main(['generate', '--generator', {str(tiny_onnx)!r}, '-n', '12', '--out', 'digits', '--format', {fmt!r}])\n"
    )
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "digits" / written).is_file()


@pytest.mark.parametrize("command", [["info"], ["evaluate", "--num-samples", "100", "--json"]])
def test_info_and_evaluate_without_torch(tmp_path: Path, tiny_mnist: Path, command: list[str]) -> None:
    args = [*command, "--data-dir", str(tiny_mnist)] if command[0] == "evaluate" else command
    code = f"from digitgen.cli import main\nmain({args!r})\n"
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_shipped_model_through_api_without_torch(tmp_path: Path) -> None:
    code = (
        "from digitgen import DigitGenerator\n"
        "out = DigitGenerator.from_path().generate(10, seed=1)\n"
        "assert out.images.shape == (10, 28, 28), out.images.shape\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("command", [["evaluate", "--cas"], ["train", "--steps", "1"]])
def test_commands_needing_torch_name_the_extra(tmp_path: Path, tiny_mnist: Path, command: list[str]) -> None:
    code = f"from digitgen.cli import main\nmain({[*command, '--data-dir', str(tiny_mnist)]!r})\n"
    result = _run_python(code, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (  # one line: before any work (evaluating) or progress
        f"Error: this needs the train extra (torch is not installed): {PIP} '{REPO}[train]'"
    ), result.stderr

"""torchrun with two CPU processes (gloo): identical weights on both ranks, exact resume, export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from digitgen.export.onnx_export import export_generator
from tests.conftest import REPO


def torchrun(*args: object) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "cli.py"),
        "train",
        *map(str, args),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_training_agrees_resumes_and_exports(tmp_path: Path, tiny_mnist: Path) -> None:
    common = ("--data-dir", tiny_mnist, "--batch-size", 8, "--device", "cpu", "--checkpoint-every", 3)
    straight = torchrun(*common, "--out", tmp_path / "straight", "--steps", 6)
    assert "distributed: 2 processes, effective batch 16 (2 x 8)" in straight.stderr
    assert "generator weights identical on all 2 ranks" in straight.stderr

    torchrun(*common, "--out", tmp_path / "resumed", "--steps", 3)
    torchrun(*common, "--out", tmp_path / "resumed", "--steps", 6, "--resume", tmp_path / "resumed" / "checkpoint.pt")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and len(a["rng"]["noise"]) == 2
    for part in ("generator", "generator_ema", "discriminator"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])

    report = export_generator(tmp_path / "straight" / "checkpoint.pt", tmp_path / "g.onnx")
    assert report.passed and (tmp_path / "g.onnx").is_file()

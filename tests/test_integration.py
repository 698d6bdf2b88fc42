"""End to end in real processes: train on an MNIST subset -> export -> generate every format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitgen.runtime.idx import read_idx
from tests.conftest import REPO, SHARED_MNIST
from tests.helpers import write_tiny_mnist


def cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (SHARED_MNIST / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return SHARED_MNIST
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist"), train_count=1024)


def test_train_export_generate_every_format(tmp_path: Path, mnist_root: Path) -> None:
    cli(
        "train",
        "--data-dir",
        mnist_root,
        "--out",
        "run",
        "--subset",
        1024,
        "--steps",
        40,
        "--batch-size",
        32,
        "--seed",
        1,
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    exported = cli("export", "--checkpoint", "run/checkpoint.pt", "--out", "g.onnx", cwd=tmp_path)
    assert exported.stdout.count("ok (atol") == 6

    common = ("generate", "--generator", "g.onnx", "-n", 30, "--seed", 4)
    for fmt in ("png", "grid", "npz", "idx"):
        cli(*common, "--format", fmt, "--out", f"out_{fmt}", cwd=tmp_path)
    pngs = sorted((tmp_path / "out_png").glob("*.png"))
    png_images = np.stack([np.asarray(Image.open(p)) for p in pngs])
    with np.load(tmp_path / "out_npz" / "digits.npz") as archive:
        npz_images, npz_labels = archive["images"], archive["labels"]
    idx_images = read_idx(tmp_path / "out_idx" / "train-images-idx3-ubyte")
    idx_labels = read_idx(tmp_path / "out_idx" / "train-labels-idx1-ubyte")
    assert len(pngs) == 30 and np.array_equal(png_images, npz_images) and np.array_equal(idx_images, npz_images)
    assert npz_labels.tolist() == idx_labels.tolist() == [i % 10 for i in range(30)]
    assert Image.open(tmp_path / "out_grid" / "grid.png").size == (302, 92)

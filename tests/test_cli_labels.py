"""The digits `generate` is asked for are the digits it draws, in every output format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from digitgen.cli import main
from digitgen.runtime.generator import DigitGenerator
from digitgen.runtime.idx import read_idx


def generate(tiny_onnx: Path, out: Path, fmt: str, *choice: str) -> None:
    args = ["generate", "--generator", str(tiny_onnx), "-n", "12", "--seed", "3", "--out", str(out), "--format", fmt]
    result = CliRunner().invoke(main, [*args, *choice])
    assert result.exit_code == 0, result.output


def read_pngs(folder: Path) -> tuple[np.ndarray, list[int]]:
    """Images in index order and the labels their names carry."""
    paths = sorted(folder.glob("*.png"))
    images = np.stack([np.asarray(Image.open(p)) for p in paths])
    return images, [int(p.stem.rsplit("_label", 1)[1]) for p in paths]


def read_idx_pair(folder: Path) -> tuple[np.ndarray, list[int]]:
    return read_idx(folder / "train-images-idx3-ubyte"), read_idx(folder / "train-labels-idx1-ubyte").tolist()


def read_npz(folder: Path) -> tuple[np.ndarray, list[int]]:
    with np.load(folder / "digits.npz") as data:
        return data["images"], data["labels"].tolist()


READERS = {"png": read_pngs, "idx": read_idx_pair, "npz": read_npz}


@pytest.mark.parametrize("fmt", sorted(READERS))
@pytest.mark.parametrize(
    ("choice", "labels"),
    [(("--digit", "7"), [7] * 12), (("--digits", "1,7,4"), [1, 7, 4] * 4)],
    ids=["digit", "digits"],
)
def test_generated_files_hold_the_requested_digits(
    tmp_path: Path, tiny_onnx: Path, fmt: str, choice: tuple[str, ...], labels: list[int]
) -> None:
    """Labelled as asked, and drawn as asked: the pixels are the library's for those labels."""
    generate(tiny_onnx, tmp_path, fmt, *choice)
    images, written_labels = READERS[fmt](tmp_path)

    library = DigitGenerator.from_path(tiny_onnx, "cpu")
    expected = library.generate(12, digits=labels[:3], seed=3)
    assert written_labels == labels == expected.labels.tolist()
    np.testing.assert_array_equal(images, expected.images)
    other = library.generate(12, digits=[(label + 1) % 10 for label in labels[:3]], seed=3)
    assert not np.array_equal(other.images, expected.images)  # the comparison tells labels apart

"""`generate --format mnist` writes a root that torchvision's own MNIST loader reads, both splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import MNIST

from digitgen.runtime import DigitGenerator, InvalidRequestError, generate_files
from digitgen.runtime.shards import Shard


@pytest.fixture(scope="module")
def gen(tiny_onnx: Path) -> DigitGenerator:
    return DigitGenerator.from_path(tiny_onnx, "cpu")


@pytest.mark.parametrize("batch_size", [7, 64])  # a batch straddles the split, or holds all of it
def test_torchvision_loads_both_splits_with_the_library_digits(
    gen: DigitGenerator, tmp_path: Path, batch_size: int
) -> None:
    generate_files(gen, tmp_path, 30, "mnist", digits=[0, 3, 7], seed=9, batch_size=batch_size, test_count=12)
    train, test = MNIST(str(tmp_path), train=True, download=False), MNIST(str(tmp_path), train=False, download=False)
    expected = gen.generate(42, digits=[0, 3, 7], seed=9)
    assert np.array_equal(train.data.numpy(), expected.images[:30])
    assert np.array_equal(train.targets.numpy(), expected.labels[:30])
    assert np.array_equal(test.data.numpy(), expected.images[30:])  # the digits after the train split: no overlap
    assert np.array_equal(test.targets.numpy(), expected.labels[30:])


def test_the_test_split_defaults_to_mnist_size(gen: DigitGenerator, tmp_path: Path) -> None:
    generate_files(gen, tmp_path, 10, "mnist", seed=1)
    assert len(MNIST(str(tmp_path), train=False, download=False)) == 10_000


@pytest.mark.parametrize(
    ("fmt", "options", "message"),
    [
        ("idx", {"test_count": 5}, "by --format mnist only"),
        ("mnist", {"test_count": 0}, "at least one digit"),
        ("mnist", {"shard": Shard(0, 2)}, "not sharded"),
    ],
)
def test_mnist_options_are_honoured_or_refused(
    gen: DigitGenerator, tmp_path: Path, fmt: str, options: dict, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        generate_files(gen, tmp_path / "out", 10, fmt, **options)
    assert not (tmp_path / "out").exists()

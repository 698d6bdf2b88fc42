"""`generate --format mnist` writes a root that torchvision's own MNIST loader reads, both splits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import MNIST

from digitgen.runtime import DigitGenerator, InvalidRequestError, generate_files, write_digits
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


@pytest.mark.parametrize("start_type", [int, np.uint64, np.int32])  # numpy's uint64 and int64 make floats
def test_write_digits_takes_the_test_split_too(gen: DigitGenerator, tmp_path: Path, start_type: type) -> None:
    """The streaming API writes the same root from batches the caller made: 30 train digits then 12 test, their
    starts of any integer type."""
    generate_files(gen, tmp_path / "files", 30, "mnist", seed=9, test_count=12)
    batches = (dataclasses.replace(b, start=start_type(b.start)) for b in gen.iter_batches(42, seed=9, batch_size=8))
    write_digits(batches, tmp_path / "streamed", "mnist", 30, test_count=12)
    for split in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"MNIST/raw/{split}-{kind}-ubyte"
            assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "files" / name).read_bytes()


def test_the_test_split_defaults_to_mnist_size(gen: DigitGenerator, tmp_path: Path) -> None:
    generate_files(gen, tmp_path, 10, "mnist", seed=1)
    assert len(MNIST(str(tmp_path), train=False, download=False)) == 10_000


@pytest.mark.parametrize(
    ("fmt", "options", "message"),
    [
        ("idx", {"test_count": 5}, "by the mnist format only"),
        ("mnist", {"test_count": 0}, "the test split's count must be an integer >= 1, got 0"),
        ("mnist", {"shard": Shard(0, 2)}, "not sharded"),
    ],
)
def test_mnist_options_are_honoured_or_refused(
    gen: DigitGenerator, tmp_path: Path, fmt: str, options: dict, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        generate_files(gen, tmp_path / "out", 10, fmt, **options)
    assert not (tmp_path / "out").exists()

"""The IDX format: written and read back, and every malformed file named with what is wrong."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from digitgen.runtime import InvalidRequestError
from digitgen.runtime.idx import check_idx, idx_header, is_whole_idx, read_idx, read_mnist_split
from tests.helpers import write_idx

IMAGES = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
LABELS = np.array([7, 0, 9])


def test_images_and_labels_round_trip_with_mnist_headers(tmp_path: Path) -> None:
    write_idx(tmp_path / "images", IMAGES)
    write_idx(tmp_path / "labels", LABELS)
    assert (tmp_path / "images").read_bytes()[:16] == struct.pack(">IIII", 0x803, 3, 28, 28)
    assert (tmp_path / "labels").read_bytes() == struct.pack(">II", 0x801, 3) + bytes([7, 0, 9])
    assert np.array_equal(read_idx(tmp_path / "images"), IMAGES) and read_idx(tmp_path / "images").dtype == np.uint8
    assert check_idx(tmp_path / "images", images=True) == (3, 28, 28)
    assert check_idx(tmp_path / "labels", images=False) == (3,)


def _bad(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("content", "kind", "message"),
    [
        (b"\x00\x00", None, "is not an MNIST IDX file (truncated header or magic 0x00000000)"),
        (
            struct.pack(">II", 0x999, 1) + b"\x00",
            None,
            "is not an MNIST IDX file (truncated header or magic 0x00000999)",
        ),
        (struct.pack(">II", 0x801, 3) + b"\x01\x02\x03", True, "is not an MNIST IDX file of images"),
        (struct.pack(">IIII", 0x803, 1, 28, 28) + bytes(784), False, "is not an MNIST IDX file of labels"),
        (struct.pack(">IIII", 0x803, 1, 14, 14) + bytes(196), None, "images are 14x14, expected 28x28"),
        (
            struct.pack(">II", 0x801, 4) + b"\x01\x02\x03",
            None,
            "is truncated or corrupt (11 bytes, expected 12 for 4 items)",
        ),
    ],
    ids=["short-header", "magic", "labels-for-images", "images-for-labels", "size", "truncated"],
)
def test_malformed_files_are_named(tmp_path: Path, content: bytes, kind: bool | None, message: str) -> None:
    path = _bad(tmp_path, content)
    with pytest.raises(InvalidRequestError) as caught:
        check_idx(path, kind)
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_missing_file_and_mismatched_split(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="IDX file not found"):
        read_idx(tmp_path / "none")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte", IMAGES)
    write_idx(raw / "t10k-labels-idx1-ubyte", LABELS[:2])
    with pytest.raises(InvalidRequestError, match="3 t10k images but 2 labels"):
        read_mnist_split(tmp_path, "t10k")
    write_idx(raw / "t10k-labels-idx1-ubyte", LABELS)
    images, labels = read_mnist_split(tmp_path, "t10k")
    assert images.shape == (3, 28, 28) and labels.dtype == np.int64 and labels.tolist() == [7, 0, 9]


def test_the_header_count_is_32_bits_and_a_larger_one_is_refused() -> None:
    """merge checks nothing else before it writes a header, so the limit lives in idx_header itself."""
    assert idx_header(2**32 - 1, images=False)[4:] == b"\xff\xff\xff\xff"
    with pytest.raises(InvalidRequestError, match=r"^an IDX file holds at most 4,294,967,295 digits"):
        idx_header(2**32, images=True)


def _idx(type_code: int, dims: tuple[int, ...], payload: int) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + bytes(payload)


@pytest.mark.parametrize(
    ("content", "whole"),
    [
        (_idx(0x08, (3, 28, 28), 3 * 784), True),  # MNIST's images
        (_idx(0x08, (3, 32, 32), 3 * 1024), True),  # another shape: whole all the same
        (_idx(0x0D, (3,), 12), True),  # floats, four bytes each
        (_idx(0x0E, (2, 2), 32), True),  # doubles
        (_idx(0x08, (3, 28, 28), 3 * 784 - 1), False),  # cut short
        (_idx(0x08, (3, 28, 28), 3 * 784 + 1), False),  # more than its header says
        (_idx(0x07, (3,), 3), False),  # no IDX type
        (b"\x01" + _idx(0x08, (3,), 3)[1:], False),  # the magic's first two bytes are zeros
        (b"\x00\x01" + _idx(0x08, (3,), 3)[2:], False),
        (bytes([0, 0, 8, 0]), False),  # no dimension
        (bytes([0, 0, 8, 3]) + struct.pack(">I", 3), False),  # a header cut short
        (b"\x00\x00", False),
        (b"", False),
        # 2^21 x 2^21 x 2^22 = 2^64 items: a 64-bit product would wrap to 0 and take the bare header for whole
        (_idx(0x08, (2**21, 2**21, 2**22), 0), False),
    ],
)
def test_a_whole_idx_file_is_one_as_long_as_its_header_says_whatever_it_holds(
    tmp_path: Path, content: bytes, whole: bool
) -> None:
    path = tmp_path / "file-idx3-ubyte"
    path.write_bytes(content)
    assert is_whole_idx(path) is whole

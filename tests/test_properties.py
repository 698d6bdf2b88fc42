"""Property-based tests: random requests never fail with anything but the typed errors."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from digitgen.cli import main
from digitgen.runtime import DigitGenerator, InvalidRequestError, write_digits
from digitgen.runtime.encode import is_whole_png, png_bytes
from digitgen.runtime.noise import MAX_SEED

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def gen(tiny_onnx: Path) -> DigitGenerator:
    return DigitGenerator.from_path(tiny_onnx, "cpu")


@SETTINGS
@given(
    num=st.integers(-5, 120),
    digits=st.none() | st.lists(st.integers(-3, 13), max_size=5),
    seed=st.integers(-3, 2**40) | st.integers(MAX_SEED - 2, MAX_SEED + 2),
    batch_size=st.integers(-2, 300),
)
def test_api_returns_digits_or_a_typed_error(gen: DigitGenerator, num, digits, seed, batch_size) -> None:
    valid = (
        num >= 1
        and batch_size >= 1
        and 0 <= seed <= MAX_SEED
        and (digits is None or (len(digits) > 0 and all(0 <= d < 10 for d in digits)))
    )
    if not valid:
        with pytest.raises(InvalidRequestError):
            gen.generate(num, digits, seed, batch_size)
        return
    out = gen.generate(num, digits, seed, batch_size)
    cycle = digits if digits is not None else list(range(10))
    assert out.images.shape == (num, 28, 28) and out.images.dtype == np.uint8
    assert out.labels.tolist() == [cycle[i % len(cycle)] for i in range(num)]


@SETTINGS
@given(
    num=st.integers(1, 80), seed=st.integers(0, 2**32), batch_sizes=st.tuples(st.integers(1, 90), st.integers(1, 90))
)
def test_same_seed_same_bytes_across_batch_sizes_and_formats(
    gen: DigitGenerator, tmp_path_factory, num, seed, batch_sizes
) -> None:
    first = gen.generate(num, seed=seed, batch_size=batch_sizes[0]).images
    assert np.array_equal(gen.generate(num, seed=seed, batch_size=batch_sizes[1]).images, first)
    out = tmp_path_factory.mktemp("fmt")
    write_digits(gen.iter_batches(num, seed=seed, batch_size=batch_sizes[1]), out, "idx", num)
    idx_bytes = (out / "train-images-idx3-ubyte").read_bytes()[16:]
    assert idx_bytes == first.tobytes()


@SETTINGS
@given(
    n=st.text(max_size=6) | st.integers(-5, 50).map(str),
    digits=st.text(alphabet="0123456789,- x", max_size=8),
)
def test_cli_parsing_never_crashes(tiny_onnx: Path, tmp_path_factory, n: str, digits: str) -> None:
    out = tmp_path_factory.mktemp("cli")
    args = [
        "generate",
        "--generator",
        str(tiny_onnx),
        "-n",
        n,
        "--digits",
        digits,
        "--out",
        str(out),
        "--format",
        "npz",
        "--provider",
        "cpu",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 1, 2), result.output
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    if result.exit_code != 0:
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
        assert not (out / "digits.npz").exists()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), flip=st.integers(0, 10_000), bit=st.sampled_from([0x01, 0x10, 0x80]))
def test_a_whole_png_is_told_from_a_truncated_or_damaged_one(seed: int, flip: int, bit: int) -> None:
    """What ``generate --resume`` replaces (a damaged file) and what it refuses (another run's whole file)."""
    encoded = png_bytes(np.random.default_rng(seed).integers(0, 256, (28, 28)).astype(np.uint8))
    assert is_whole_png(encoded)
    assert not any(is_whole_png(encoded[:size]) for size in range(len(encoded)))  # cut anywhere
    assert not is_whole_png(encoded + b"\0")
    damaged = bytearray(encoded)
    damaged[flip % len(encoded)] ^= bit
    assert not is_whole_png(bytes(damaged))
    huge = bytearray(encoded)
    huge[8] |= 0x80  # the first chunk's length past 2^31: read unsigned, it runs past the end
    assert not is_whole_png(bytes(huge))


@SETTINGS
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.0, 1.0),
)
def test_png_encoder_round_trips_through_an_independent_decoder(height, width, seed, density) -> None:
    """``png_bytes`` is the project's own encoder: Pillow, with its CRC checks, reads back every pixel."""
    rng = np.random.default_rng(seed)
    image = np.where(rng.random((height, width)) < density, rng.integers(0, 256, (height, width)), 0).astype(np.uint8)
    encoded = png_bytes(image)
    with Image.open(io.BytesIO(encoded)) as decoded:
        decoded.verify()  # every chunk's CRC
    with Image.open(io.BytesIO(encoded)) as decoded:
        assert decoded.mode == "L" and decoded.size == (width, height)
        assert np.array_equal(np.asarray(decoded), image)
    # Pillow stops reading once it has every row and lets some header fields pass, so the chunks, the
    # header and the zlib stream's end and checksum are checked here
    chunks = _png_chunks(encoded)
    assert [name for name, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    # bit depth 8, greyscale, deflate, adaptive filtering (method 0), no interlace: what every decoder reads
    assert chunks[0][1] == struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0) and chunks[2][1] == b""
    stream = zlib.decompressobj()
    rows = stream.decompress(chunks[1][1])
    assert stream.eof and not stream.unused_data
    assert rows == b"".join(b"\0" + row.tobytes() for row in image)  # filter type 0 on every row


def _png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) chunks of ``png``, which must run from its signature to its last byte."""
    position, chunks = 8, []
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        chunks.append((png[position + 4 : position + 8], png[position + 8 : position + 8 + length]))
        position += 12 + length
    assert position == len(png), "a chunk runs past the end"
    return chunks

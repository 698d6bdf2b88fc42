"""Every output format, read back and compared with the API's images; output-path safety."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitgen.runtime import (
    FORMATS,
    DigitGenerator,
    InvalidRequestError,
    OutputError,
    Shard,
    TooManyDigitsError,
    generate_files,
    write_digits,
)
from digitgen.runtime.encode import contact_sheet
from digitgen.runtime.generator import empty_digits
from digitgen.runtime.idx import read_idx
from digitgen.runtime.layout import GRID_FILE, GRID_MAX_DIGITS, IDX_IMAGES_FILE, IDX_LABELS_FILE, NPZ_FILE, png_name
from digitgen.runtime.writers import collect, plan_output

N = 23


HUGE = 10**5000


@pytest.fixture(scope="module")
def gen(tiny_onnx: Path) -> DigitGenerator:
    return DigitGenerator.from_path(tiny_onnx, "cpu")


def _write(gen: DigitGenerator, out: Path, fmt: str, **kwargs) -> list[Path]:
    return write_digits(gen.iter_batches(N, seed=2, batch_size=5), out, fmt, N, **kwargs)


def test_png_one_file_per_digit(gen: DigitGenerator, tmp_path: Path) -> None:
    expected = gen.generate(N, seed=2)
    assert _write(gen, tmp_path, "png") == [tmp_path]
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == [png_name(i, i % 10) for i in range(N)]
    for i, path in enumerate(files):
        assert np.array_equal(np.asarray(Image.open(path)), expected.images[i])


def test_grid_contact_sheet(gen: DigitGenerator, tmp_path: Path) -> None:
    (path,) = _write(gen, tmp_path, "grid")
    sheet = np.asarray(Image.open(path))
    assert path.name == GRID_FILE and sheet.shape == (3 * 30 + 2, 10 * 30 + 2)
    assert np.array_equal(sheet[2:30, 2:30], gen.generate(1, seed=2).images[0])
    assert sheet[0, 0] == sheet[30, 150] == 128  # mid-grey gaps around every cell
    assert contact_sheet(gen.generate(3, seed=2).images).dtype == np.uint8  # the API's picture, not only its PNG


def test_a_grid_too_large_names_every_format_that_holds_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        plan_output(tmp_path, "grid", GRID_MAX_DIGITS + 1)
    assert str(refused.value) == f"a grid holds at most {GRID_MAX_DIGITS} digits; use png, npz, idx or mnist"
    assert [fmt for fmt in FORMATS if fmt != "grid" and fmt not in str(refused.value)] == []
    assert list(tmp_path.iterdir()) == []


def test_npz_arrays(gen: DigitGenerator, tmp_path: Path) -> None:
    (path,) = _write(gen, tmp_path, "npz")
    with np.load(path) as archive:
        assert archive["images"].dtype == np.uint8 and archive["images"].shape == (N, 28, 28)
        assert archive["labels"].dtype == np.int64
        assert np.array_equal(archive["images"], gen.generate(N, seed=2).images)
    assert path.name == NPZ_FILE


def test_idx_pair_reads_like_mnist(gen: DigitGenerator, tmp_path: Path) -> None:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    _write(gen, tmp_path, "idx")
    expected = gen.generate(N, seed=2)
    assert np.array_equal(read_idx(tmp_path / IDX_IMAGES_FILE), expected.images)
    assert np.array_equal(read_image_file(str(tmp_path / IDX_IMAGES_FILE)).numpy(), expected.images)
    assert read_label_file(str(tmp_path / IDX_LABELS_FILE)).tolist() == expected.labels.tolist()


@pytest.mark.parametrize("fmt", ["png", "grid", "npz", "idx"])
def test_existing_outputs_are_kept_unless_overwrite(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    _write(gen, tmp_path, fmt)
    first = sorted(tmp_path.iterdir())
    stamp = {p: p.stat().st_mtime_ns for p in first}
    with pytest.raises(OutputError, match="--overwrite"):
        _write(gen, tmp_path, fmt)
    assert {p: p.stat().st_mtime_ns for p in first} == stamp
    _write(gen, tmp_path, fmt, overwrite=True)
    assert sorted(tmp_path.iterdir()) == first


def test_out_is_a_file(gen: DigitGenerator, tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(OutputError, match=f"^output directory {re.escape(str(target))} is a file, not a directory$"):
        _write(gen, target, "png")
    with pytest.raises(OutputError, match="lies under"):
        _write(gen, target / "sub", "png")


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_out_is_a_link_to_nothing(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    """Named as one, with what it points to, not as a folder that cannot be written; nothing is created."""
    link = tmp_path / "digits"
    link.symlink_to(tmp_path / "gone")
    for out, where in ((link, "is"), (link / "sub", f"lies under {link}, which is")):
        message = f"output directory {out} {where} a link to {tmp_path / 'gone'}, which does not exist: create it,"
        with pytest.raises(OutputError, match=re.escape(message)):
            _write(gen, out, fmt)
    assert sorted(tmp_path.iterdir()) == [link]


def test_out_is_a_link_in_a_loop_of_links(gen: DigitGenerator, tmp_path: Path) -> None:
    """Named as a loop (it had been called a link to a file that does not exist)."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    message = (
        f"output directory {tmp_path / 'a'} is a link in a loop of links ({tmp_path / 'a'} -> {tmp_path / 'b'} -> ...)"
    )
    with pytest.raises(OutputError, match=re.escape(message)):
        _write(gen, tmp_path / "a", "png")


def test_out_that_cannot_be_written(gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Named before any work (the root user writes any folder, so access is faked)."""
    import os

    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: access(path, mode) and not (Path(path) == tmp_path and mode & os.W_OK)
    )
    with pytest.raises(OutputError, match=f"^output directory {tmp_path} is not writable$"):
        _write(gen, tmp_path, "png")
    assert list(tmp_path.iterdir()) == []


def test_out_that_cannot_be_listed(gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its listing says what a run would replace (the root user reads any folder, so access is faked)."""
    import os

    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: access(path, mode) and (Path(path), mode) != (tmp_path, os.R_OK)
    )
    with pytest.raises(OutputError, match=f"^output directory {tmp_path} is not readable$"):
        _write(gen, tmp_path, "png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["idx", "npz", "grid"])
def test_interrupted_stream_leaves_no_partial_file(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    def interrupted():
        batches = gen.iter_batches(N, seed=2, batch_size=5)
        yield next(batches)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_digits(interrupted(), tmp_path, fmt, N)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_png_leaves_only_complete_files(gen: DigitGenerator, tmp_path: Path) -> None:
    def interrupted():
        batches = gen.iter_batches(N, seed=2, batch_size=5)
        yield next(batches)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_digits(interrupted(), tmp_path, "png", N)
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [png_name(i, i) for i in range(5)]
    assert all(np.asarray(Image.open(f)).shape == (28, 28) for f in files)


def test_digits_past_numpys_address_space_are_a_memory_error() -> None:
    """numpy refuses such an array with a ValueError, a merely too large one with its own MemoryError."""
    for num in (2**62, 2**40):
        with pytest.raises(TooManyDigitsError) as refused:
            collect([], num)
        assert str(refused.value) == (
            f"{num} digits do not fit in memory at once (npz and grid hold every digit, png and idx stream them)"
        )
        with pytest.raises(TooManyDigitsError) as refused:
            empty_digits(num)  # with no advice: the refusal alone
        assert str(refused.value) == f"{num} digits do not fit in memory at once"


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ({"overwrite": "no"}, "overwrite must be True or False, got 'no'"),
        ({"resume": 1}, "resume must be True or False, got 1"),
        ({"shard": (0, 2)}, r"shard must be a Shard\(index, count\), got \(0, 2\)"),
    ],
)
def test_options_of_the_wrong_type_are_refused_before_any_file_is_touched(
    tmp_path: Path, option: dict, words: str
) -> None:
    (tmp_path / NPZ_FILE).write_bytes(b"mine")
    with pytest.raises(InvalidRequestError, match=f"^{words}$"):
        plan_output(tmp_path, "npz", 10, **option)
    assert (tmp_path / NPZ_FILE).read_bytes() == b"mine"


@pytest.mark.parametrize("total", [0, -3, "5", None, 2.5, True, 2**63 + 1])
def test_a_total_that_is_not_a_count_of_digits_is_refused_in_words(tmp_path: Path, total: object) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        plan_output(tmp_path / "out", "npz", total)  # type: ignore[arg-type]
    assert str(refused.value) == f"number of digits must be an integer from 1 to {2**63}, got {total!r}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [  # integers past the 4,300 digits Python writes out: named by their length, not a bare ValueError
        ({"shard": Shard(HUGE, HUGE + 1)}, "an integer of about 5,000 digits shards for 10 digits would leave some"),
        ({"shard": Shard(0, -HUGE)}, "the number of shards must be at least 1, got a negative integer of about 5,00"),
        ({"shard": Shard(HUGE, 3)}, "shard index must be in 0..2 for 3 shards"),
        ({"fmt": "mnist", "test_count": HUGE}, "32 bits), not an integer of about 5,000 digits"),
    ],
)
def test_integers_too_long_to_write_out_are_refused_in_words(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        plan_output(tmp_path, kwargs.pop("fmt", "npz"), 10, **kwargs)


def test_generate_files_refuses_a_generator_that_is_not_one(tmp_path: Path) -> None:
    refusal = "gen must be a DigitGenerator (DigitGenerator.from_path(...)), got str"
    with pytest.raises(InvalidRequestError, match=f"^{re.escape(refusal)}$"):
        generate_files("artifacts/generator.onnx", tmp_path, 3, "npz")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_threads_too_many_to_write_out_are_refused_in_words(tiny_onnx: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"^threads must be an integer from 1 to 1024, got an integer of abo"):
        DigitGenerator.from_path(tiny_onnx, "cpu", threads=HUGE)


def test_counts_may_be_numpy_integers(tmp_path: Path) -> None:
    plan = plan_output(tmp_path, "mnist", np.int64(5), test_count=np.int64(3))
    assert (plan.total, plan.test_count) == (5, 3) and type(plan.total) is int


@pytest.mark.parametrize("fmt", ["png", "npz", "idx"])
def test_generate_files_takes_numpy_integers_for_its_count_and_shard(
    gen: DigitGenerator, tmp_path: Path, fmt: str
) -> None:
    """As ``generate`` and ``write_digits`` do: the count and the shard go into a sharded run's JSON record."""
    generate_files(gen, tmp_path / "numpy", np.int64(7), fmt, shard=Shard(np.int64(1), np.int64(2)))
    generate_files(gen, tmp_path / "int", 7, fmt, shard=Shard(1, 2))
    files = [{path.name: path.read_bytes() for path in (tmp_path / run).iterdir()} for run in ("numpy", "int")]
    assert files[0] == files[1] and len(files[0]) == {"png": 4, "npz": 2, "idx": 3}[fmt]


def test_generate_files_refuses_a_shard_that_is_not_a_shard(gen: DigitGenerator, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"^shard must be a Shard\(index, count\), got \(0, 2\)$"):
        generate_files(gen, tmp_path / "out", 30, "npz", shard=(0, 2))  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_existing_files_are_counted_in_the_refusal(tmp_path: Path) -> None:
    for index in range(3):
        (tmp_path / png_name(index, index)).write_bytes(b"mine")
    with pytest.raises(OutputError, match=f"^{tmp_path / png_name(0, 0)} and 2 more already exist; pass"):
        plan_output(tmp_path, "png", 3)
    (tmp_path / png_name(2, 2)).unlink()
    with pytest.raises(OutputError, match=f"^{tmp_path / png_name(0, 0)} and 1 more already exist; pass"):
        plan_output(tmp_path, "png", 3)
    (tmp_path / png_name(1, 1)).unlink()
    resume = "pass --resume to continue an interrupted run of this command, or --overwrite to replace it"
    with pytest.raises(OutputError, match=f"^{tmp_path / png_name(0, 0)} already exists; {resume}$"):
        plan_output(tmp_path, "png", 3)
    (tmp_path / "digits.npz").write_bytes(b"mine")  # an interrupted NPZ leaves no file: nothing to resume
    with pytest.raises(
        OutputError, match=f"^{tmp_path / 'digits.npz'} already exists; pass --overwrite to replace it$"
    ):
        plan_output(tmp_path, "npz", 3)

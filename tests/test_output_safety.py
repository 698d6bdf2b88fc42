"""No output is replaced without --overwrite, and a writer never publishes a wrong count of digits."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import CodeType, FrameType

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from digitgen import cli
from digitgen.cli import main
from digitgen.runtime import (
    DigitGenerator,
    GeneratedDigits,
    InvalidRequestError,
    ModelRunError,
    OutputError,
    Shard,
    files,
    generate_files,
    index_lock,
    signals,
    write_digits,
    writers,
)
from digitgen.runtime.encode import png_bytes
from digitgen.runtime.evaluate import ReferenceClassifier
from digitgen.runtime.files import (
    atomic_files,
    claim_temporary,
    publish,
    publish_all,
    refuse_existing,
    refuse_non_files,
    refuse_one_file_twice,
    temporary_name,
)
from digitgen.runtime.idx import read_idx
from digitgen.runtime.layout import FORMATS, PNG_NAME, png_name
from digitgen.runtime.merge import merge_shards
from digitgen.runtime.writers import plan_generation
from digitgen.training.checkpoint import FORMAT_VERSION
from tests.test_export import EVALUATION

N = 12


@pytest.fixture(scope="module")
def gen(tiny_onnx: Path) -> DigitGenerator:
    return DigitGenerator.from_path(tiny_onnx, "cpu")


def _fewer(gen: DigitGenerator) -> list[GeneratedDigits]:
    return list(gen.iter_batches(N - 2, seed=1, batch_size=5))


def _more(gen: DigitGenerator) -> list[GeneratedDigits]:
    return list(gen.iter_batches(N + 3, seed=1, batch_size=5))


def _gap(gen: DigitGenerator) -> list[GeneratedDigits]:
    first, _, third = gen.iter_batches(N, seed=1, batch_size=4)
    return [first, third, third]


def _unlabelled(gen: DigitGenerator) -> list[GeneratedDigits]:
    first, *rest = gen.iter_batches(N, seed=1, batch_size=4)
    return [GeneratedDigits(first.images, first.labels[:-1], first.start), *rest]


def _second_changed(gen: DigitGenerator, **change: object) -> list:
    """The right digits, but the second batch's arrays replaced."""
    first, second, *rest = gen.iter_batches(N, seed=1, batch_size=4)
    fields = {"images": second.images, "labels": second.labels, "start": second.start, **change}
    return [first, GeneratedDigits(**fields), *rest]


def _second_as_a_tuple(gen: DigitGenerator) -> list:
    first, second, *rest = gen.iter_batches(N, seed=1, batch_size=4)
    return [first, (second.images, second.labels), *rest]


WRONG_ARRAYS = {
    "small images": lambda gen: _second_changed(gen, images=np.zeros((4, 3, 3), np.uint8)),
    "float images": lambda gen: _second_changed(gen, images=np.zeros((4, 28, 28), np.float32)),
    "label 300": lambda gen: _second_changed(gen, labels=np.array([1, 2, 300, 4])),
    "label -1": lambda gen: _second_changed(gen, labels=np.array([1, 2, -1, 4])),
    "float labels": lambda gen: _second_changed(gen, labels=np.array([1.0, 2.0, 3.0, 4.0])),
    "list labels": lambda gen: _second_changed(gen, labels=[1, 2, 3, 4]),
    "list images": lambda gen: _second_changed(gen, images=[[0]] * 4),
    "label 256": lambda gen: _second_changed(gen, labels=np.array([1, 2, 256, 4])),
    "float start": lambda gen: _second_changed(gen, start=4.0),
    "no batch": lambda gen: [*_second_changed(gen)[:1], None],
    "a tuple": _second_as_a_tuple,
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "batches",
    [_fewer, _more, _gap, _unlabelled, *WRONG_ARRAYS.values()],
    ids=["fewer", "more", "gap", "unlabelled", *WRONG_ARRAYS],
)
def test_writer_fed_the_wrong_digits_raises_and_leaves_no_file(
    gen: DigitGenerator, tmp_path: Path, fmt: str, batches
) -> None:
    with pytest.raises(InvalidRequestError, match="no new file was kept"):
        write_digits(batches(gen), tmp_path / "new" / "out", fmt, N)
    assert list(tmp_path.iterdir()) == []  # nor the folders it made for them


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_a_run_that_fails_or_is_stopped_before_any_file_leaves_no_folder_it_made(
    gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """A model that fails on its first batch; a Ctrl-C before any file is complete. A folder that was there
    already stays, empty or not."""
    with monkeypatch.context() as failing:

        def fail(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
            raise ModelRunError("onnxruntime failed")

        failing.setattr(gen, "run", fail)
        with pytest.raises(ModelRunError):
            generate_files(gen, tmp_path / "new" / "out", N, fmt)
    assert list(tmp_path.iterdir()) == []

    def stop(count: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path / "new", N, "npz", batch_size=4, on_batch=stop)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "mine", tmp_path / "new" / ".." / "mine"):  # the second makes "new", not "mine"
        with pytest.raises(KeyboardInterrupt):
            generate_files(gen, out, N, "npz", batch_size=4, on_batch=stop)
        assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_labels_up_to_255_are_written(gen: DigitGenerator, tmp_path: Path) -> None:
    """The largest label a byte holds, as a model of 256 classes makes."""
    (batch,) = gen.iter_batches(2, batch_size=2)
    write_digits([GeneratedDigits(batch.images, np.array([0, 255]), 0)], tmp_path, "idx", 2)
    assert read_idx(tmp_path / "train-labels-idx1-ubyte").tolist() == [0, 255]


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        ("small images", "a batch's images must be uint8 (N, 28, 28), got uint8 (4, 3, 3)"),
        ("no batch", "a batch must be a GeneratedDigits(images, labels, start), got NoneType"),
        ("a tuple", "a batch must be a GeneratedDigits(images, labels, start), got tuple"),
        ("label 300", "a batch's labels must be 0-255, got 1 to 300"),
        ("label -1", "a batch's labels must be 0-255, got -1 to 4"),
        ("float labels", "a batch's labels must be integers 0-255 of shape (N,), got float64 (4,)"),
        ("float start", "a batch's start must be an integer, got 4.0"),
        ("list labels", "a batch's labels must be integers 0-255 of shape (N,), got list"),
        ("list images", "a batch's images must be uint8 (N, 28, 28), got list"),
        ("label 256", "a batch's labels must be 0-255, got 1 to 256"),
    ],
)
def test_a_wrong_batch_is_described_by_what_it_holds(
    gen: DigitGenerator, tmp_path: Path, wrong: str, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as error:
        write_digits(WRONG_ARRAYS[wrong](gen), tmp_path, "npz", N)
    assert str(error.value) == f"{message}; no new file was kept"


def test_any_path_like_names_the_output_and_the_model(gen: DigitGenerator, tmp_path: Path, tiny_onnx: Path) -> None:
    class PathLike:  # what pytest's tmpdir and other path objects are
        def __init__(self, path: Path) -> None:
            self.path = path

        def __fspath__(self) -> str:
            return str(self.path)

    assert DigitGenerator.from_path(PathLike(tiny_onnx), "cpu").sha256 == gen.sha256
    generate_files(gen, PathLike(tmp_path / "out"), 2, "npz")
    assert (tmp_path / "out" / "digits.npz").is_file()


def test_arguments_of_the_wrong_type_are_refused_before_any_file_or_folder(gen: DigitGenerator, tmp_path: Path) -> None:
    out = tmp_path / "out"
    calls = {
        "the output directory must be a path (a str or a pathlib.Path), got NoneType None": lambda: generate_files(
            gen, None, 3
        ),
        "on_batch must be a function, e.g. lambda count: None, got None": lambda: generate_files(
            gen, out, 3, on_batch=None
        ),
        "batches must be an iterable of GeneratedDigits, got NoneType": lambda: write_digits(None, out, "png", 4),
        "on_batch must be a function, e.g. lambda count: None, got 3": lambda: write_digits(
            [], out, "png", 4, on_batch=3
        ),
        "the model's path must be a path (a str or a pathlib.Path), got int 5": lambda: DigitGenerator.from_path(5),
        # no file name holds a NUL: os.stat()'s ValueError had come through untyped
        "the model's path 'a\\x00b' holds a NUL character, which no file name can": lambda: DigitGenerator.from_path(
            "a\0b"
        ),
        "the output directory 'x\\x00y' holds a NUL character, which no file name can": lambda: generate_files(
            gen, "x\0y", 3
        ),
        "the classifier's path 'c\\x00.onnx' holds a NUL character, which no file name can": lambda: (
            ReferenceClassifier("c\0.onnx")
        ),
        "the shards' directory must be a path (a str or a pathlib.Path), got bytes b'dir'": lambda: merge_shards(
            b"dir", "idx"
        ),
        "the shards' directory is an empty path; name a file or folder ('.' for the current folder)": lambda: (
            merge_shards("", "idx")
        ),
    }
    for message, call in calls.items():
        with pytest.raises(InvalidRequestError) as refused:
            call()
        assert str(refused.value) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("permission", ["overwrite", "resume"])
def test_png_writer_fed_the_wrong_digits_keeps_the_files_that_were_there(
    gen: DigitGenerator, tmp_path: Path, permission: str
) -> None:
    """Only what the failed call created goes: the user's files past the failure point stay as they were."""
    generate_files(gen, tmp_path, 4, seed=1)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(InvalidRequestError, match="no new file was kept"):
        write_digits(_more(gen), tmp_path, "png", N, **{permission: True})
    after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert after == before


@pytest.mark.parametrize(
    ("missing", "replaced"),
    [(0, "4 files it had replaced hold"), (3, "1 file it had replaced holds")],
)
def test_png_overwrite_fed_a_wrong_batch_says_how_many_files_it_had_replaced(
    gen: DigitGenerator, tmp_path: Path, missing: int, replaced: str
) -> None:
    """Replaced files cannot be put back: the error says they now hold this request's digits (files the first
    batch created, where none was, are removed)."""
    generate_files(gen, tmp_path, N, seed=9)
    for path in sorted(tmp_path.iterdir())[1 : 1 + missing]:
        path.unlink()
    with pytest.raises(InvalidRequestError) as refused:
        write_digits(WRONG_ARRAYS["float images"](gen), tmp_path, "png", N, overwrite=True)
    assert str(refused.value) == (
        "a batch's images must be uint8 (N, 28, 28), got float32 (4, 28, 28); no new file was kept; "
        f"{replaced} this request's digits now (--overwrite)"
    )
    (first,) = gen.iter_batches(4, seed=1, batch_size=4)
    files = sorted(tmp_path.iterdir())
    assert len(files) == N - missing
    assert [path.read_bytes() for path in files[: 4 - missing]] == [png_bytes(i) for i in first.images[: 4 - missing]]


def test_generate_files_writes_what_the_cli_writes(gen: DigitGenerator, tmp_path: Path, tiny_onnx: Path) -> None:
    generate_files(gen, tmp_path / "api", N, "npz", digits=[2, 5], seed=4, batch_size=5)
    args = ["generate", "--generator", tiny_onnx, "-n", N, "--digits", "2,5", "--seed", 4, "--format", "npz"]
    result = CliRunner().invoke(main, [*map(str, args), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    api, cli = np.load(tmp_path / "api" / "digits.npz"), np.load(tmp_path / "cli" / "digits.npz")
    assert np.array_equal(api["images"], cli["images"]) and api["labels"].tolist() == [2, 5] * (N // 2)


def test_png_overwrite_replaces_an_index_whatever_its_label(gen: DigitGenerator, tmp_path: Path) -> None:
    generate_files(gen, tmp_path, 4, digits=[7])
    (tmp_path / "notes.txt").write_text("mine")
    generate_files(gen, tmp_path, 3, overwrite=True)
    names = sorted(p.name for p in tmp_path.iterdir())  # digit 3 (a longer run's) goes too: the folder is this run's
    assert names == sorted([png_name(0, 0), png_name(1, 1), png_name(2, 2), "notes.txt"])


@pytest.mark.parametrize("overwrite", [False, True])
def test_png_runs_leave_names_digitgen_never_writes(gen: DigitGenerator, tmp_path: Path, overwrite: bool) -> None:
    """Only png_name()'s own names are digits: a ninth digit padded with a zero, a label with one, other scripts'
    digits (which int() reads) or a line break after the name are a user's, neither refused nor removed."""
    theirs = ["000000001_label1.png", "00000001_label01.png", "0000001_label1.png", "00000001_label1.png.bak"]
    theirs += ["\u0660" * 7 + "1_label1.png", "00000001_label\u0661.png", "00000001_label1.png\n"]
    theirs += [".000000001_label1.png.part", "." + "\u0660" * 7 + "1_label1.png.part"]  # nor a temporary file of one
    for name in theirs:
        (tmp_path / name).write_text("mine")
    generate_files(gen, tmp_path, 3, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*theirs, png_name(0, 0), png_name(1, 1), png_name(2, 2)]
    )
    assert all((tmp_path / name).read_text() == "mine" for name in theirs)
    assert [
        int(match[1])
        for name in (png_name(123_456_789, 12), "00000000_label0.png")
        if (match := PNG_NAME.fullmatch(name))
    ] == [123_456_789, 0]


def test_a_shard_overwriting_removes_no_digit_outside_its_shard(gen: DigitGenerator, tmp_path: Path) -> None:
    generate_files(gen, tmp_path, 8, shard=Shard(1, 2))  # digits 4-7 of an 8-digit run, another job's
    generate_files(gen, tmp_path, 4, shard=Shard(0, 2), overwrite=True)  # digits 0-1 of a 4-digit run
    assert sorted(p.name for p in tmp_path.iterdir()) == [png_name(i, i) for i in (0, 1, 4, 5, 6, 7)]


@pytest.mark.parametrize("overwrite", [False, True])
def test_every_png_run_removes_what_a_killed_run_left_in_its_indices(
    gen: DigitGenerator, tmp_path: Path, overwrite: bool
) -> None:
    """A killed run's temporary files of other labels: no later run writes their names, so it removes them."""
    if overwrite:
        generate_files(gen, tmp_path, 4, digits=[3])
    for index, label in ((1, 5), (9, 5)):  # index 9 is past this run's digits: another run's to remove
        temporary_name(tmp_path / png_name(index, label)).write_bytes(b"\x89PNG half")
    generate_files(gen, tmp_path, 4, overwrite=overwrite)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [temporary_name(tmp_path / png_name(9, 5)).name, *(png_name(i, i) for i in range(4))]


def test_a_shard_removes_a_killed_runs_temporaries_of_its_own_indices_only(gen: DigitGenerator, tmp_path: Path) -> None:
    """Just outside its range, a temporary file is the neighbouring shard's, which may be writing it now."""
    for index in (2, 3, 5, 6):  # shard 1 of 3 of 9 digits writes 3, 4 and 5
        temporary_name(tmp_path / png_name(index, 9)).write_bytes(b"\x89PNG half")
    generate_files(gen, tmp_path, 9, shard=Shard(1, 3))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == [
        temporary_name(tmp_path / png_name(index, 9)).name for index in (2, 6)
    ]


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_export_refuses_to_replace_a_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "g.onnx"
    out.write_bytes(b"my model")
    code, output = _cli("export", "--checkpoint", tiny_checkpoint, "--out", out)
    assert code == 1 and output.strip() == f"Error: {out} already exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"my model"
    code, output = _cli("export", "--checkpoint", tiny_checkpoint, "--out", out, "--overwrite")
    assert code == 0, output
    assert DigitGenerator.from_path(out, "cpu").latent_dim == 8


@pytest.mark.parametrize("fmt", ["npz", "png"])
def test_a_dangling_link_in_the_way_is_refused_like_a_file(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    """The link is the user's (it may name a file they mean to create elsewhere): replacing it needs --overwrite."""
    link = tmp_path / ("digits.npz" if fmt == "npz" else "00000000_label0.png")
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(
        OutputError, match=f"^{link} already exists; pass (--resume .*, or )?--overwrite to replace it$"
    ):
        generate_files(gen, tmp_path, 3, fmt)
    assert link.is_symlink() and sorted(tmp_path.iterdir()) == [link]


@pytest.mark.parametrize("fmt", ["npz", "png", "idx", "grid"])
@pytest.mark.parametrize("permission", ["overwrite", "resume"])
def test_a_dangling_link_in_the_way_is_replaced_when_allowed(
    gen: DigitGenerator, tmp_path: Path, fmt: str, permission: str
) -> None:
    names = {"npz": "digits.npz", "png": "00000000_label0.png", "idx": "train-images-idx3-ubyte", "grid": "grid.png"}
    link = tmp_path / names[fmt]
    link.symlink_to(tmp_path / "nowhere")
    generate_files(gen, tmp_path / "expected", 3, fmt)
    generate_files(gen, tmp_path, 3, fmt, **{permission: True})
    assert not link.is_symlink() and link.read_bytes() == (tmp_path / "expected" / names[fmt]).read_bytes()
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("fmt", ["npz", "png", "idx", "grid"])
@pytest.mark.parametrize("kind", ["link", "dangling link", "pipe", "pipe being read"])
@pytest.mark.parametrize("permission", [{}, {"overwrite": True}, {"resume": True}])
def test_what_is_not_a_file_under_a_temporary_name_is_refused_and_left_as_it_is(
    gen: DigitGenerator, tmp_path: Path, fmt: str, kind: str, permission: dict, request: pytest.FixtureRequest
) -> None:
    """A link's target is not this run's to empty, and a pipe would block the run for ever: both are refused."""
    names = {"npz": "digits.npz", "png": png_name(2, 2), "idx": "train-images-idx3-ubyte", "grid": "grid.png"}
    kept = tmp_path / "thesis.txt"
    kept.write_bytes(b"three years of work")
    out = tmp_path / "out"
    out.mkdir()
    tmp = temporary_name(out / names[fmt])
    if kind.startswith("pipe"):
        os.mkfifo(tmp)
        if kind == "pipe being read":  # opened to write at once, then found not to be a file
            reader = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK)
            request.addfinalizer(lambda: os.close(reader))
    else:
        tmp.symlink_to(kept if kind == "link" else tmp_path / "nowhere")
    message = f"^{tmp} is not a file a run left \\(a link, a pipe or a device has a temporary file's name\\); "
    with pytest.raises(OutputError, match=message + "remove it, or write elsewhere$"):
        generate_files(gen, out, 5, fmt, **permission)
    assert kept.read_bytes() == b"three years of work"
    assert os.listdir(out) == [tmp.name] and not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("kind", ["notes", "pipe"])
def test_a_users_file_under_the_index_lock_name_is_refused_and_left(tmp_path: Path, tiny_onnx: Path, kind: str) -> None:
    """The lock file is an empty file: a user's notes or pipe of its name is never locked, waited on or removed."""
    lock = tmp_path / ".digitgen.lock"
    if kind == "pipe":
        os.mkfifo(lock)
    else:
        lock.write_text("mine")
    command = [sys.executable, "-m", "digitgen", "generate", "-n", "3", "--out", tmp_path, "--generator", tiny_onnx]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)  # a pipe was once waited on
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"Error: {lock} is not a lock file of digitgen's, an empty file a PNG run keeps there; move it"
    )
    assert sorted(tmp_path.iterdir()) == [lock]
    assert lock.is_fifo() if kind == "pipe" else lock.read_text() == "mine"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc")
def test_a_file_is_on_the_disk_before_its_rename_but_pngs_are_not_synced_one_by_one(
    gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced, sync = [], os.fsync

    def recorded(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        sync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    generate_files(gen, tmp_path / "npz", 5, "npz")
    assert synced == [str(temporary_name(tmp_path / "npz" / "digits.npz")), str(tmp_path / "npz")]
    synced.clear()
    generate_files(gen, tmp_path / "png", 5, "png")
    assert synced == []  # --resume repairs what a power cut leaves of them

    def folders_refused(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")  # as some file systems answer for a folder
        sync(fd)

    monkeypatch.setattr(os, "fsync", folders_refused)
    generate_files(gen, tmp_path / "npz", 5, "npz", overwrite=True)
    assert np.load(tmp_path / "npz" / "digits.npz")["images"].shape == (5, 28, 28)


def test_a_temporary_file_in_a_missing_folder_is_the_systems_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):  # not taken for a link or a pipe: publish_all words it
        claim_temporary(temporary_name(tmp_path / "gone" / "digits.npz"))


def test_export_refuses_to_replace_release_weights(tmp_path: Path, tiny_checkpoint: Path) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"mine")
    code, output = _cli(
        "export", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "g.onnx", "--weights-out", weights
    )
    assert code == 1 and "already exists" in output
    assert weights.read_bytes() == b"mine" and not (tmp_path / "g.onnx").exists()


def test_train_classifier_needs_an_out_and_refuses_to_replace_it(tmp_path: Path, tiny_mnist: Path) -> None:
    code, output = _cli("train-classifier", "--data-dir", tiny_mnist)
    assert code != 0 and "Missing option '--out'" in output
    out = tmp_path / "classifier.onnx"
    out.write_bytes(b"my classifier")
    code, output = _cli("train-classifier", "--data-dir", tiny_mnist, "--out", out)
    assert code == 1 and output.strip() == f"Error: {out} already exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"my classifier"


def _unwritable_folder() -> Path | None:
    """A folder no process may create a file in, not even root's (sysfs), where this system has one."""
    folder = Path("/sys")
    try:
        os.close(os.open(folder / "digitgen-probe", os.O_WRONLY | os.O_CREAT, 0o666))
    except OSError:
        return folder
    return None


@pytest.mark.skipif(_unwritable_folder() is None, reason="no folder here that refuses every writer")
def test_train_classifier_finds_an_unwritable_out_before_it_trains(
    tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def trained(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("trained before finding that its result could not be written")

    monkeypatch.setattr("digitgen.export.classifier_export.train_classifier", trained)
    out = _unwritable_folder() / "classifier.onnx"
    code, output = _cli("train-classifier", "--data-dir", tiny_mnist, "--out", out, "--epochs", "1")
    assert code == 1 and output.strip().startswith(f"Error: cannot write {out}: ")


def test_a_png_just_past_the_requested_range_is_not_a_clash(gen: DigitGenerator, tmp_path: Path) -> None:
    generate_files(gen, tmp_path, 4, digits=[7])
    (tmp_path / png_name(0, 7)).unlink()
    generate_files(gen, tmp_path, 1)  # index 0 is free again; index 1 onwards lies past the request
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        png_name(0, 0),
        png_name(1, 7),
        png_name(2, 7),
        png_name(3, 7),
    ]


def test_generate_files_defaults_to_seed_zero(gen: DigitGenerator, tmp_path: Path) -> None:
    generate_files(gen, tmp_path, N, "npz")
    assert np.array_equal(np.load(tmp_path / "digits.npz")["images"], gen.generate(N, seed=0).images)


@pytest.mark.parametrize("fmt", ["npz", "grid"])
def test_a_folder_where_the_file_goes_is_a_one_line_error(tmp_path: Path, tiny_onnx: Path, fmt: str) -> None:
    target = "digits.npz" if fmt == "npz" else "grid.png"
    (tmp_path / target).mkdir()
    (tmp_path / target / "keep.txt").write_text("mine")
    args = [
        "generate",
        "--generator",
        str(tiny_onnx),
        "-n",
        "4",
        "--format",
        fmt,
        "--out",
        str(tmp_path),
        "--overwrite",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {tmp_path / target} is a folder, not a file; move it, or name another file\n"
    assert (tmp_path / target / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target]


def test_publish_keeps_the_projects_own_errors_as_raised(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"^mine$"), publish(tmp_path / "x") as tmp:
        tmp.write_bytes(b"part")
        raise OutputError("mine")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_between_two_renames_waits_until_both_are_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (Ctrl-C to the CLI) as the first of an IDX pair is renamed: both new files, then the interrupt;
    with another thread running, as onnxruntime's are, which the kernel may hand the signal to."""
    import os
    import signal
    import threading

    paths = [tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"]
    for path in paths:
        path.write_bytes(b"old")
    replace = os.replace

    def replace_then_terminate(source: Path, target: Path) -> None:
        replace(source, target)
        os.kill(os.getpid(), signal.SIGTERM)

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_terminate)
    previous = signal.signal(signal.SIGTERM, interrupt)
    done = threading.Event()
    other = threading.Thread(target=done.wait)
    other.start()
    try:
        with pytest.raises(KeyboardInterrupt), atomic_files(paths) as files:
            for f in files:
                f.write(b"new")
    finally:
        signal.signal(signal.SIGTERM, previous)
        done.set()
        other.join()
    assert [path.read_bytes() for path in paths] == [b"new", b"new"]
    assert sorted(tmp_path.iterdir()) == sorted(paths)


def test_atomic_files_keeps_identical_files_and_names_the_one_it_cannot_write(tmp_path: Path) -> None:
    same, other, blocked = tmp_path / "same", tmp_path / "other", tmp_path / "blocked"
    same.write_bytes(b"same")
    other.write_bytes(b"old")
    before = same.stat().st_mtime_ns
    vetted: list[Path] = []
    with atomic_files([same, other], resume=vetted.append) as (same_f, other_f):
        same_f.write(b"same")
        other_f.write(b"new")
    assert (same.stat().st_mtime_ns, other.read_bytes(), vetted) == (before, b"new", [other])
    (blocked / "mine").mkdir(parents=True)
    with pytest.raises(OutputError, match=f"^cannot write {blocked}: "), atomic_files([other, blocked]) as files:
        for f in files:
            f.write(b"x")
    assert (blocked / "mine").is_dir() and sorted(tmp_path.iterdir()) == [blocked, other, same]


def test_export_into_a_missing_weights_folder_leaves_nothing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    weights = tmp_path / "nowhere" / "weights.pt"
    code, output = _cli(
        "export", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "g.onnx", "--weights-out", weights
    )
    assert (code, output.strip()) == (1, f"Error: output directory {weights.parent} does not exist")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file.onnx").write_bytes(b"mine")
    code, output = _cli("export", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "file.onnx" / "g.onnx")
    assert (code, output.strip()) == (1, f"Error: output directory {tmp_path / 'file.onnx'} is a file, not a directory")


def test_a_release_weights_write_that_fails_leaves_no_model(tmp_path: Path, tiny_checkpoint: Path, monkeypatch) -> None:
    """A full disk while the weights are written: named in the system's words, and no model is left."""
    write_bytes = Path.write_bytes

    def full_disk(path: Path, data: bytes) -> int:
        if "weights.pt" in path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    weights = tmp_path / "weights.pt"
    code, output = _cli(
        "export", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "g.onnx", "--weights-out", weights
    )
    assert (code, output.strip()) == (1, f"Error: cannot write {weights}: No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["device", "pipe", "large"])
def test_export_quality_reads_a_regular_file_of_at_most_1_mib(tmp_path: Path, tiny_checkpoint: Path, kind: str) -> None:
    """A device would be read for ever (and into memory), a pipe waited on for good."""
    quality = Path("/dev/zero") if kind == "device" else tmp_path / "quality.json"
    if kind == "pipe":
        os.mkfifo(quality)
    elif kind == "large":
        quality.write_bytes(b" " * (1 << 20) + b"{}")
    code, output = _cli("export", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "g.onnx", "--quality", quality)
    words = "is over 1 MiB: not what evaluate --json writes" if kind == "large" else "is not a regular file"
    assert code == 2 and output.startswith(f"Error: Invalid value for '--quality': {quality} {words}")
    assert not (tmp_path / "g.onnx").exists()


def test_export_quality_that_is_not_text_is_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    quality = tmp_path / "quality.json"
    quality.write_bytes(b"\xf8\xff not text")
    code, output = _cli("export", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "g.onnx", "--quality", quality)
    assert code == 2 and f"{quality} holds no JSON object" in output and "Traceback" not in output
    assert not (tmp_path / "g.onnx").exists()


@pytest.mark.parametrize(
    ("args", "same"),
    [
        (["--out", "{dir}/g.onnx", "--weights-out", "{dir}/g.onnx"], "--out and --weights-out"),
        (["--out", "{dir}/g.onnx", "--weights-out", "{checkpoint}"], "--checkpoint and --weights-out"),
        (["--out", "{checkpoint}"], "--checkpoint and --out"),
    ],
)
def test_export_refuses_one_file_for_two_roles(tmp_path: Path, tiny_checkpoint: Path, args: list, same: str) -> None:
    """Even with --overwrite: the weights would land in the ONNX file's place, or over the checkpoint."""
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(tiny_checkpoint.read_bytes())
    filled = [arg.format(dir=tmp_path, checkpoint=checkpoint) for arg in args]
    code, output = _cli("export", "--checkpoint", checkpoint, *filled, "--overwrite")
    assert code == 1 and output.startswith(f"Error: {same} name the same file ("), output
    assert checkpoint.read_bytes() == tiny_checkpoint.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(
    ("train", "problem"),
    [
        ({}, "checkpoint training settings is invalid: "),
        ("x", "checkpoint training settings is not a mapping"),
        ({"total_steps": 4, "batch": 3}, "checkpoint training settings has unknown fields: batch"),
        ({"total_steps": 4, "batch": 3, 1: 2}, "checkpoint training settings has unknown fields: 1, batch"),  # any key
    ],
)
def test_export_checks_the_training_settings_it_writes_into_the_model(
    tmp_path: Path, tiny_checkpoint: Path, train: object, problem: str
) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["train"] = train
    torch.save(payload, tmp_path / "edited.pt")
    code, output = _cli("export", "--checkpoint", tmp_path / "edited.pt", "--out", tmp_path / "g.onnx")
    assert code == 1 and output.startswith(f"Error: {problem}") and len(output.splitlines()) == 1, output
    assert not (tmp_path / "g.onnx").exists()


def test_a_checkpoint_whose_format_is_a_tensor_is_refused_in_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Compared with ==, a tensor there gave no true or false but a RuntimeError, and a traceback."""
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["format_version"] = torch.zeros(3)
    torch.save(payload, tmp_path / "edited.pt")
    code, output = _cli("export", "--checkpoint", tmp_path / "edited.pt", "--out", tmp_path / "g.onnx")
    assert (code, output.strip()) == (
        1,
        f"Error: {tmp_path / 'edited.pt'}: checkpoint format a Tensor, this version reads {FORMAT_VERSION}",
    )


# --- two runs writing the same files at once -------------------------------------------------------


@pytest.mark.parametrize(("fmt", "name"), [("idx", "train-images-idx3-ubyte"), ("npz", "digits.npz")])
@pytest.mark.parametrize("permission", [{}, {"overwrite": True}, {"resume": True}])
def test_a_file_another_process_is_writing_is_refused_before_any_digit(
    gen: DigitGenerator, tmp_path: Path, fmt: str, name: str, permission: dict
) -> None:
    """Another run holds the temporary file (a lock, as a second process would): this run is refused before it
    generates anything, and the other run's temporary file is left alone, even by --resume's clean-up."""
    tmp = temporary_name(tmp_path / name)
    held = claim_temporary(tmp)
    os.write(held, b"the other run's bytes")
    batches: list[int] = []
    try:
        with pytest.raises(OutputError) as refused:
            generate_files(gen, tmp_path, N, fmt, on_batch=batches.append, **permission)
        assert str(refused.value) == (
            f"another process is writing {tmp_path / name} now (its temporary file {tmp.name} is in use); "
            "let it finish, or write elsewhere"
        )
        assert batches == [] and tmp.read_bytes() == b"the other run's bytes"
        assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name]
    finally:
        os.close(held)
    generate_files(gen, tmp_path, N, fmt, **permission)  # the lock goes with the other run
    assert (tmp_path / name).exists() and not tmp.exists()


def test_the_cli_refuses_a_file_being_written_in_one_line_before_any_progress(tmp_path: Path) -> None:
    tmp = temporary_name(tmp_path / "digits.npz")
    held = claim_temporary(tmp)
    try:
        code, output = _cli("generate", "-n", 5, "--format", "npz", "--out", tmp_path)
    finally:
        os.close(held)
    assert code == 1 and output == (
        f"Error: another process is writing {tmp_path / 'digits.npz'} now (its temporary file .digits.npz.part is "
        "in use); let it finish, or write elsewhere\n"
    )


def test_a_png_another_process_writes_meanwhile_stops_the_run(gen: DigitGenerator, tmp_path: Path) -> None:
    """The folder was checked empty; then, while this run writes, another one writes digit 6 of the same range."""
    other, out = tmp_path / "other", tmp_path / "out"
    generate_files(gen, other, N, seed=9)
    sixth = other / png_name(6, 6)
    theirs = sixth.read_bytes()

    def batches():
        for batch in gen.iter_batches(N, seed=1, batch_size=4):
            yield batch
            if batch.start == 0:
                sixth.rename(out / sixth.name)

    with pytest.raises(OutputError) as refused:
        write_digits(batches(), out, "png", N)
    assert str(refused.value) == (
        f"{out / sixth.name} appeared while this run was writing: another process is writing to {out}; "
        "let it finish, or write elsewhere"
    )
    assert (out / sixth.name).read_bytes() == theirs


@pytest.mark.parametrize(
    ("fmt", "overwrite", "name"),
    [
        ("npz", False, "digits.npz"),
        ("idx", False, "train-labels-idx1-ubyte"),
        ("grid", True, "grid.png"),  # --overwrite replaces what was there when the run was checked, not what came
        ("mnist", False, "MNIST/raw/t10k-images-idx3-ubyte"),
    ],
)
def test_a_file_another_process_writes_meanwhile_stops_the_run(
    gen: DigitGenerator, tmp_path: Path, fmt: str, overwrite: bool, name: str
) -> None:
    """The folder was checked; then, while this run writes, another one writes one of its files: refused, kept."""
    out = tmp_path / "out"

    def batches():
        for batch in gen.iter_batches(2 * N if fmt == "mnist" else N, seed=1, batch_size=4):  # mnist: a test split
            yield batch
            if batch.start == 0:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_bytes(b"theirs")

    with pytest.raises(OutputError) as refused:
        write_digits(batches(), out, fmt, N, overwrite=overwrite, test_count=N if fmt == "mnist" else None)
    assert str(refused.value) == _appeared(out / name)
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == [name]  # theirs only
    assert (out / name).read_bytes() == b"theirs"


def _appeared(path: Path) -> str:
    return (
        f"{path} appeared while this run was writing: another process is writing to {path.parent}; "
        "let it finish, or write elsewhere"
    )


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_model_another_process_writes_meanwhile_stops_the_export(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    from digitgen.export import onnx_export

    out, weights = tmp_path / "g.onnx", tmp_path / "g_weights.pt"
    verify = onnx_export.verify_parity

    def verify_then_another_writes(*args, **kwargs):
        weights.write_bytes(b"theirs")  # the export checked the folder seconds ago
        return verify(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "verify_parity", verify_then_another_writes)
    with pytest.raises(OutputError) as refused:
        onnx_export.export_generator(tiny_checkpoint, out, weights_out=weights, overwrite=overwrite)
    assert str(refused.value) == _appeared(weights)
    assert sorted(tmp_path.iterdir()) == [weights] and weights.read_bytes() == b"theirs"  # and no model without it


def test_a_file_another_process_writes_meanwhile_stops_the_merge(
    gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from digitgen.runtime import merge

    for index in range(2):
        generate_files(gen, tmp_path, N, "npz", shard=Shard(index, 2))
    concat = merge.concat_npz

    def concat_then_another_writes(parts):
        (tmp_path / "digits.npz").write_bytes(b"theirs")
        return concat(parts)

    monkeypatch.setattr(merge, "concat_npz", concat_then_another_writes)
    with pytest.raises(OutputError) as refused:
        merge.merge_shards(tmp_path, "npz")
    assert str(refused.value) == _appeared(tmp_path / "digits.npz")
    assert (tmp_path / "digits.npz").read_bytes() == b"theirs"


needs_locks = pytest.mark.skipif(index_lock.fcntl is None, reason="Windows has no file locks here")


def _folder(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _in_use(folder: Path) -> str:
    return f"another run is writing PNG digits of the same indices to {folder} now; let it finish, or write elsewhere"


@needs_locks
@pytest.mark.parametrize("permission", [{}, {"overwrite": True}, {"resume": True}])
def test_png_indices_another_run_writes_are_refused_before_any_digit(
    gen: DigitGenerator, tmp_path: Path, permission: dict
) -> None:
    """Another run holds the folder's indices (its lock, taken as a second process takes it): refused before
    any digit, --overwrite or not, and the folder stays as it was."""
    generate_files(gen, tmp_path, N, seed=1)
    before, batches = _folder(tmp_path), []
    with index_lock.claim_indices(tmp_path, 0, None), pytest.raises(OutputError) as refused:
        generate_files(gen, tmp_path, N, seed=2, on_batch=batches.append, **permission)
    assert str(refused.value) == _in_use(tmp_path)
    assert batches == [] and _folder(tmp_path) == before


@needs_locks
def test_a_png_run_planned_before_another_took_its_indices_is_refused_when_it_writes(
    gen: DigitGenerator, tmp_path: Path
) -> None:
    generate_files(gen, tmp_path, N, seed=1)
    before = _folder(tmp_path)
    job = plan_generation(gen, tmp_path, N, seed=2, overwrite=True)
    with index_lock.claim_indices(tmp_path, 0, None), pytest.raises(OutputError) as refused:
        job.run()
    assert str(refused.value) == _in_use(tmp_path) and _folder(tmp_path) == before


@needs_locks
def test_png_shards_write_side_by_side_and_only_other_indices(gen: DigitGenerator, tmp_path: Path) -> None:
    whole, out = tmp_path / "whole", tmp_path / "out"
    generate_files(gen, whole, N, seed=3)
    out.mkdir()
    with index_lock.claim_indices(out, *Shard(0, 2).bounds(N)):
        generate_files(gen, out, N, seed=3, shard=Shard(1, 2))  # other indices: written beside the first shard
        for shard in Shard(0, 2), Shard(0, 1):  # the same indices, or all of them
            with pytest.raises(OutputError, match="another run is writing PNG digits"):
                generate_files(gen, out, N, seed=3, shard=shard, overwrite=True)
        assert (out / index_lock.LOCK_FILE).exists()
    generate_files(gen, out, N, seed=3, shard=Shard(0, 2))
    assert _folder(out) == _folder(whole)  # the lock file gone with the last run


@needs_locks
def test_a_run_claims_exactly_its_own_indices(gen: DigitGenerator, tmp_path: Path) -> None:
    """Shard 1 of 3 (digits 4-7) writes beside a run holding shard 2 (8-11); a whole run does not, even beside a
    run holding only the last indices."""
    with index_lock.claim_indices(tmp_path, *Shard(2, 3).bounds(N)):
        generate_files(gen, tmp_path, N, shard=Shard(1, 3))
    assert sorted(path.name for path in tmp_path.iterdir()) == [png_name(i, i % 10) for i in range(4, 8)]
    with index_lock.claim_indices(tmp_path, *Shard(1, 2).bounds(N)), pytest.raises(OutputError, match="same indices"):
        generate_files(gen, tmp_path, N, overwrite=True)


ANOTHER_PROCESS_HOLDS_8_TO_11 = """
import sys
from pathlib import Path
from digitgen.runtime import index_lock
index_lock._OFD_SETLK = None  # fcntl.lockf, as on macOS
with index_lock.claim_indices(Path(sys.argv[1]), 8, 12):
    print("held", flush=True)
    sys.stdin.read()
"""


@needs_locks
def test_the_posix_record_locks_used_where_linux_locks_are_missing_exclude_other_processes(
    gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", ANOTHER_PROCESS_HOLDS_8_TO_11, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        monkeypatch.setattr(index_lock, "_OFD_SETLK", None)  # fcntl.lockf: locks of this process, as on macOS
        with pytest.raises(OutputError, match="same indices"):
            generate_files(gen, tmp_path, N, shard=Shard(2, 3))
        generate_files(gen, tmp_path, N, shard=Shard(1, 3))  # 4-7: beside the other process's 8-11
    finally:
        holder.communicate(b"", timeout=30)
    assert sorted(path.name for path in tmp_path.glob("*.png")) == [png_name(i, i % 10) for i in range(4, 8)]


@needs_locks
def test_a_lock_file_that_cannot_be_made_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(index_lock.os, "open", refused)
    with pytest.raises(OutputError) as error, index_lock.claim_indices(tmp_path, 0, None):
        pass
    assert str(error.value) == f"cannot write {tmp_path / index_lock.LOCK_FILE}: Permission denied"


@needs_locks
def test_a_lock_file_removed_before_it_was_locked_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run that let go last removed the file between this one opening and locking it: open it again."""
    looks = iter([False, True])
    monkeypatch.setattr(files, "still_named", lambda fd, path: next(looks))
    with index_lock.claim_indices(tmp_path, 0, None):
        assert (tmp_path / index_lock.LOCK_FILE).exists()
    assert list(looks) == [] and not (tmp_path / index_lock.LOCK_FILE).exists()


@needs_locks
def test_a_lock_file_a_killed_run_left_is_reused_and_removed(gen: DigitGenerator, tmp_path: Path) -> None:
    (tmp_path / index_lock.LOCK_FILE).write_bytes(b"")
    generate_files(gen, tmp_path, N, seed=1)
    assert (
        sorted(_folder(tmp_path)) == sorted(png.name for png in tmp_path.glob("*.png")) and len(_folder(tmp_path)) == N
    )


@needs_locks
def test_two_overwriting_png_runs_at_once_leave_one_runs_folder(gen: DigitGenerator, tmp_path: Path) -> None:
    """Two runs started together (two threads here; two processes alike): the folder ends as one run's
    whole, never a mix, and a run that is refused says so."""
    count, out = 300, tmp_path / "out"
    expected = {}
    for seed in 3, 4:
        generate_files(gen, tmp_path / f"seed{seed}", count, seed=seed)
        expected[seed] = _folder(tmp_path / f"seed{seed}")
    generate_files(gen, out, count, seed=1)
    outcomes: dict[int, str] = {}
    start = threading.Barrier(2)

    def pause(_count: int) -> None:  # lets the other run go on between batches
        time.sleep(0.002)

    def run(seed: int) -> None:
        start.wait()
        try:
            generate_files(gen, out, count, seed=seed, batch_size=8, overwrite=True, on_batch=pause)
            outcomes[seed] = "written"
        except OutputError as exc:
            outcomes[seed] = str(exc)

    runs = [threading.Thread(target=run, args=(seed,)) for seed in (3, 4)]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join(timeout=120)
    assert _folder(out) in (expected[3], expected[4])
    written = [seed for seed, outcome in outcomes.items() if outcome == "written"]
    assert all(outcomes[seed] == _in_use(out) for seed in outcomes if seed not in written)
    if len(written) == 1:
        assert _folder(out) == expected[written[0]]


def test_an_npz_too_large_for_memory_is_refused_before_any_progress_or_folder(tmp_path: Path) -> None:
    # 10**12 digits: 784 TB, past a 64-bit machine's 128 TB of address space whatever the kernel's overcommit
    code, output = _cli("generate", "-n", 10**12, "--format", "npz", "--out", tmp_path / "out")
    assert code == 1 and output == (
        "Error: not enough memory: 1000000000000 digits do not fit in memory at once (npz and grid hold every "
        "digit, png and idx stream them); ask for less\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file", ["MNIST", "MNIST/raw"])
def test_a_file_where_mnist_puts_its_folders_is_refused_before_any_progress(tmp_path: Path, file: str) -> None:
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text("mine")
    code, output = _cli("generate", "-n", 20, "--format", "mnist", "--test-count", 2, "--out", tmp_path)
    assert code == 1 and output == (
        f"Error: {tmp_path / file} is a file where the mnist format writes a folder; move it, or write elsewhere\n"
    )
    assert (tmp_path / file).read_text() == "mine"


def test_an_empty_output_path_is_refused_in_the_api_as_on_the_command_line(
    gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=r"^the output directory is an empty path; name a folder \(\. for the"):
        generate_files(gen, "", 3)
    assert list(tmp_path.iterdir()) == []


def test_a_claim_refused_while_publishing_names_the_file_and_leaves_the_others_temporary(tmp_path: Path) -> None:
    """The claim when the writing starts (after the check at planning): refused in words, nothing removed."""
    held = claim_temporary(temporary_name(tmp_path / "b.bin"))
    try:
        with pytest.raises(OutputError) as refused, publish_all([tmp_path / "a.bin", tmp_path / "b.bin"]):
            pytest.fail("the block must not run")
    finally:
        os.close(held)
    assert str(refused.value) == (
        f"another process is writing {tmp_path / 'b.bin'} now (its temporary file .b.bin.part is in use); "
        "let it finish, or write elsewhere"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.bin.part"]  # a.bin's claim released and removed


def test_published_files_have_the_mode_of_any_new_file(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_files([tmp_path / "digits.bin"]) as (f,):
        f.write(b"x")
    assert (tmp_path / "digits.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not executable


def test_two_options_naming_one_file_are_refused_whatever_comes_before(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"^--out and --weights-out name the same file"):
        refuse_one_file_twice({"--quality": None, "--out": tmp_path / "m.onnx", "--weights-out": tmp_path / "m.onnx"})


def test_a_loop_of_links_is_one_file_as_any_other_name(tmp_path: Path) -> None:
    """Its own errors (not found, already exists) come after, from the command; here it is no crash."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    refuse_one_file_twice({"--checkpoint": tmp_path / "loop", "--out": tmp_path / "m.onnx"})
    with pytest.raises(OutputError, match=r"^--checkpoint and --out name the same file"):
        refuse_one_file_twice({"--checkpoint": tmp_path / "loop", "--out": tmp_path / "loop"})


def test_a_claim_that_loses_the_name_to_the_run_publishing_it_opens_the_name_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between this run opening the temporary file and locking it, the run that held it renames it onto its
    output: the lock then holds a published file, which this run must not truncate or write."""
    out, tmp = tmp_path / "digits.npz", temporary_name(tmp_path / "digits.npz")
    tmp.write_bytes(b"the other run's digits")
    real_lock = files.try_flock

    def publish_in_between(fd: int, **how: bool) -> bool:
        if tmp.exists() and not out.exists():
            os.replace(tmp, out)
        return real_lock(fd, **how)

    monkeypatch.setattr(files, "try_flock", publish_in_between)
    fd = claim_temporary(tmp)
    os.write(fd, b"mine")
    os.close(fd)
    assert out.read_bytes() == b"the other run's digits" and tmp.read_bytes() == b"mine"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("fmt", ["png", "npz", "idx"])
def test_resume_refuses_a_pipe_or_a_link_to_a_device_without_reading_it(
    tmp_path: Path, tiny_onnx: Path, fmt: str
) -> None:
    """A pipe is refused without being read (it would wait for a writer for ever) and kept, with --resume and with
    --overwrite: no run writes one, so none replaces one; so is a link to a device (reading /dev/zero would never
    end, and a link such as /dev/stdout is not the user's to lose). A link to a file is replaced with --overwrite,
    the link, never the file."""
    command = [sys.executable, "-m", "digitgen", "generate", "-n", "3", "--format", fmt, "--generator", tiny_onnx]
    subprocess.run([*command, "--out", tmp_path / "expected"], check=True, capture_output=True, timeout=60)
    out = tmp_path / "out"
    out.mkdir()
    first, second = {"png": (png_name(0, 0), png_name(1, 1)), "npz": ("digits.npz", "digits.npz")}.get(
        fmt, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    )
    os.mkfifo(out / second)
    for permission in ("--resume", "--overwrite"):
        done = subprocess.run([*command, "--out", out, permission], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr) == (
            1,
            f"Error: {out / second} is a pipe, not a file, and no run replaces it; name another file\n",
        )
        assert os.listdir(out) == [second] and stat.S_ISFIFO(os.lstat(out / second).st_mode)
    (out / second).unlink()
    (out / first).symlink_to("/dev/zero")
    for permission in ("--resume", "--overwrite"):
        done = subprocess.run([*command, "--out", out, permission], capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr) == (
            1,
            f"Error: {out / first} links to a device, not a file, and no run replaces it; name another file\n",
        )
    (out / first).unlink()
    (tmp_path / "elsewhere").write_bytes(b"a file of the user's")
    (out / first).symlink_to(tmp_path / "elsewhere")
    done = subprocess.run([*command, "--out", out, "--overwrite"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "elsewhere").read_bytes() == b"a file of the user's"
    expected = tmp_path / "expected"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in expected.iterdir()}
    assert not any(p.is_symlink() for p in out.iterdir())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_export_never_replaces_a_pipe_or_a_socket(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Not even with --overwrite: renamed over, it would be lost (a device node too: /dev/null made a file)."""
    pipe, sock = tmp_path / "pipe.onnx", tmp_path / "sock.onnx"
    os.mkfifo(pipe)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        for out, kind in ((pipe, "a pipe"), (sock, "a socket")):
            code, output = _cli("export", "--checkpoint", tiny_checkpoint, "--out", out, "--overwrite")
            assert (code, output) == (
                1,
                f"Error: {out} is {kind}, not a file, and no run replaces it; name another file\n",
            )
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe.onnx", "sock.onnx"]


@pytest.mark.parametrize(("fmt", "name"), [("npz", "digits.npz"), ("idx", "train-labels-idx1-ubyte"), ("png", None)])
def test_a_folder_in_the_way_is_refused_before_any_digit_is_made(
    gen: DigitGenerator, tmp_path: Path, fmt: str, name: str | None
) -> None:
    """With --resume as without it; and with --overwrite also where the folder is named like a longer run's PNG,
    which the run would remove."""
    made = []
    for permission, folder in [("resume", name or png_name(1, 1)), ("overwrite", name or png_name(99, 9))]:
        out = tmp_path / permission
        (out / folder).mkdir(parents=True)
        with pytest.raises(
            OutputError, match=f"^{out / folder} is a folder, not a file; move it, or name another file$"
        ):
            generate_files(gen, out, 3, fmt, on_batch=made.append, **{permission: True})
        assert os.listdir(out) == [folder] and made == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("fmt", ["npz", "idx"])
def test_merge_refuses_a_part_it_cannot_read_to_an_end(tmp_path: Path, gen: DigitGenerator, fmt: str) -> None:
    """In a process of its own, bounded in time: reading the pipe would wait for a writer for ever."""
    for index in range(2):
        generate_files(gen, tmp_path, 4, fmt, shard=Shard(index, 2))
    merge = [sys.executable, "-m", "digitgen", "merge", tmp_path, "--format", fmt]
    part = tmp_path / ("digits-00001-of-00002.npz" if fmt == "npz" else "train-images-idx3-ubyte-00001-of-00002")
    part.unlink()
    os.mkfifo(part)
    done = subprocess.run(merge, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        1,
        f"Error: {part} is not a file merge can read (a folder, a pipe, a device, or a link to one)\n",
    )
    record = tmp_path / f"digitgen-{fmt}-run-00000-of-00002"
    for made in tmp_path.glob("*-00001-of-00002*"):
        made.unlink()
    generate_files(gen, tmp_path, 4, fmt, shard=Shard(1, 2))
    record.unlink()
    record.symlink_to("/dev/zero")
    done = subprocess.run(merge, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        1,
        f"Error: {record} is not a file (a folder, a pipe, a device, or a link to one) where shard 0's run record "
        "belongs; move it, then run that shard again with --resume\n",
    )


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null here")
def test_every_path_is_looked_at_and_a_device_is_named_as_one(tmp_path: Path) -> None:
    """Past one that is not there; only looked at (lstat), so /dev/null itself can be the device."""
    with pytest.raises(OutputError) as refused:
        refuse_non_files([tmp_path / "missing", tmp_path, "/dev/null"])
    assert str(refused.value) == f"{tmp_path} is a folder, not a file; move it, or name another file"
    with pytest.raises(OutputError) as refused:
        refuse_non_files([tmp_path / "missing", "/dev/null"])
    assert str(refused.value) == "/dev/null is a device, not a file, and no run replaces it; name another file"
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    refuse_non_files([tmp_path / "file", tmp_path / "link", tmp_path / "dangling"])  # links replaced, not followed


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null here")
def test_a_link_to_a_device_or_a_folder_is_refused_as_they_are_even_with_overwrite(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """``/dev/stdout`` is a link to the process's output: ``export --out /dev/stdout --overwrite`` had made it a
    file (as root, for every process of the machine), and the refusal without ``--overwrite`` offered it."""
    (tmp_path / "null").symlink_to("/dev/null")
    (tmp_path / "folder").symlink_to(tmp_path)
    with pytest.raises(OutputError) as refused:
        refuse_non_files([tmp_path / "null"])
    assert (
        str(refused.value)
        == f"{tmp_path / 'null'} links to a device, not a file, and no run replaces it; name another file"
    )
    with pytest.raises(OutputError) as refused:
        refuse_existing([tmp_path / "folder"], overwrite=True)
    assert str(refused.value) == f"{tmp_path / 'folder'} links to a folder, not a file; move it, or name another file"
    for overwrite in ([], ["--overwrite"]):
        code, output = _cli("export", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "null", *overwrite)
        assert (code, output) == (
            1,
            f"Error: {tmp_path / 'null'} links to a device, not a file, and no run replaces it; name another file\n",
        )
    assert os.readlink(tmp_path / "null") == "/dev/null"


# --- no command writes over a file it reads ------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "name"), [("grid", "grid.png"), ("npz", "digits.npz"), ("png", "00000000_label0.png")])
def test_generate_refuses_to_write_over_its_model(tmp_path: Path, tiny_onnx: Path, fmt: str, name: str) -> None:
    """A model saved under an output's name, in the output folder: --overwrite would have put digits in its place."""
    model = tmp_path / name
    model.write_bytes(tiny_onnx.read_bytes())
    linked = tmp_path / "linked.onnx"
    linked.symlink_to(model)  # the model by another name: the same file
    for given in (model, linked):
        result = CliRunner().invoke(
            main,
            ["generate", "--generator", str(given), "--format", fmt, "-n", "3", "--out", str(tmp_path), "--overwrite"],
        )
        assert result.exit_code == 1
        assert result.output == f"Error: {model} is the file --generator names, which this run reads; write elsewhere\n"
    assert model.read_bytes() == tiny_onnx.read_bytes()
    elsewhere = tmp_path / "models" / name  # an output's name in another folder: nothing to refuse
    elsewhere.parent.mkdir()
    shutil.copy(model, elsewhere)
    args = ["generate", "--generator", str(elsewhere), "--format", fmt, "-n", "3", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output


def test_export_refuses_to_write_over_its_quality_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps(EVALUATION))
    before = quality.read_bytes()
    for overwrite in ([], ["--overwrite"]):
        result = CliRunner().invoke(
            main,
            [
                "export",
                "--checkpoint",
                str(tiny_checkpoint),
                "--quality",
                str(quality),
                "--out",
                str(quality),
                *overwrite,
            ],
        )
        assert result.exit_code == 1 and quality.read_bytes() == before
        assert result.output == f"Error: --quality and --out name the same file ({quality}); give each its own\n"


def test_train_classifier_refuses_to_write_over_its_data(tmp_path: Path, tiny_mnist: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_mnist, data)
    images = data / "MNIST" / "raw" / "train-images-idx3-ubyte"
    before = images.read_bytes()
    result = CliRunner().invoke(
        main, ["train-classifier", "--data-dir", str(data), "--out", str(images), "--overwrite", "--epochs", "1"]
    )
    assert result.exit_code == 1 and images.read_bytes() == before
    assert result.output == (
        f"Error: --data-dir's train-images-idx3-ubyte and --out name the same file ({images}); give each its own\n"
    )


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


# Where a stop signal can catch a write: publishing, claiming a temporary file, and holding signals back
_WRITING_CODE = {
    code.__code__
    for code in (
        files._published.__wrapped__,
        files.atomic_files.__wrapped__,
        files.claim_temporary,
        files._open_regular,
        files.still_named,
        files.check_writable,
        files.remove_leftover,
        signals.handling.__wrapped__,
        signals.interrupts_held.__wrapped__,
        signals._Holdable.__call__,
    )
}


def _signalled_at(step: int, signum: int, work: Callable[[], object], codes: set[CodeType] = _WRITING_CODE) -> bool:
    """Run ``work`` with ``signum`` arriving before the ``step``-th instruction it runs in ``codes``, as a signal
    does: through the handler in place then, which raises or (held back) records it. Whether it arrived; if it
    did, ``work`` must end in :class:`KeyboardInterrupt`, and otherwise complete."""
    seen = 0

    def each_instruction(frame: FrameType, event: str, _arg: object) -> Callable | None:
        nonlocal seen
        if event == "opcode":
            seen += 1
            if seen == step:
                signal.raise_signal(signum)
        return each_instruction

    def each_call(frame: FrameType, _event: str, _arg: object) -> Callable | None:
        if frame.f_code not in codes:
            return None
        frame.f_trace_opcodes = True
        return each_instruction

    sys.settrace(each_call)
    try:
        work()
    except KeyboardInterrupt:
        assert seen >= step, "interrupted with no signal"
        return True
    finally:
        sys.settrace(None)
    assert seen < step, "a stop signal was lost"
    return False


@pytest.mark.parametrize("before", [None, b"old"])
@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("signum", [signals.INTERRUPTING_SIGNALS[0], signals.INTERRUPTING_SIGNALS[-1]])
def test_a_stop_signal_at_any_instruction_of_a_write_leaves_the_old_files_or_the_new_and_nothing_else(
    tmp_path: Path, before: bytes | None, pair: bool, signum: int
) -> None:
    """Ctrl-C, SIGTERM or SIGHUP before any one instruction of writing a file (a PNG of a million) or a pair
    (IDX): every file old (or none) or every file new, no temporary file, and the command's handlers in place.
    Handlers change in the order of the stop signals: the first and the last of them come between changes."""
    paths = [tmp_path / "images", tmp_path / "labels"] if pair else [tmp_path / "digit.png"]

    def write() -> None:
        with atomic_files(paths, durable=False) as opened:
            for f in opened:
                f.write(b"new")

    step = 1
    with signals.handling(signals.INTERRUPTING_SIGNALS, _raise_interrupt):
        handlers = {s: signal.getsignal(s) for s in signals.INTERRUPTING_SIGNALS}
        while True:
            for path in paths:
                path.unlink(missing_ok=True)
                if before is not None:
                    path.write_bytes(before)
            arrived = _signalled_at(step, signum, write)
            old = {} if before is None else {p.name: before for p in paths}
            left = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
            assert left in ({p.name: b"new" for p in paths}, old), f"a signal at instruction {step} left {left}"
            assert {s: signal.getsignal(s) for s in signals.INTERRUPTING_SIGNALS} == handlers, step
            assert signals._held is None, f"a signal at instruction {step} left stop signals held"
            if not arrived:
                break
            step += 1
    assert step > 100  # the write's every instruction was tried


def test_a_stop_signal_while_pngs_are_written_waits_for_the_rest_of_their_group_only(
    gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop signals are held back once for a group of 32 PNGs, not once a file (which costs a few percent of the
    run) nor once a batch (up to 8,192 files: seconds): one that comes at the 40th file stops the run at the 64th."""
    encode = writers.png_bytes
    encoded = 0

    def encode_then_signal(image: np.ndarray) -> bytes:
        nonlocal encoded
        encoded += 1
        if encoded == 40:
            signal.raise_signal(signal.SIGINT)
        return encode(image)

    monkeypatch.setattr(writers, "png_bytes", encode_then_signal)
    with signals.handling(signals.INTERRUPTING_SIGNALS, _raise_interrupt), pytest.raises(KeyboardInterrupt):
        write_digits(gen.iter_batches(256, seed=1, batch_size=256), tmp_path, "png", 256)
    assert len(list(tmp_path.glob("*.png"))) == encoded == 64


def test_a_stop_signal_at_any_instruction_of_claiming_png_indices_leaves_no_lock_file(tmp_path: Path) -> None:
    """The lock file a PNG run keeps while it writes goes with the run, however a stop signal catches its claim.
    (One in the instant the run lets go, as it removes the file, can leave it: empty, and taken by the next run.)"""
    codes = {
        index_lock.claim_indices.__wrapped__.__code__,
        index_lock._open_locked.__code__,
        files.open_locked.__code__,
        signals.interrupts_held.__wrapped__.__code__,
        signals._Holdable.__call__.__code__,
    }
    claims: list[AbstractContextManager] = []

    def claim() -> None:
        claims.append(index_lock.claim_indices(tmp_path, 0, 10))
        claims[-1].__enter__()

    step = 1
    with signals.handling(signals.INTERRUPTING_SIGNALS, _raise_interrupt):
        while _signalled_at(step, signal.SIGINT, claim, codes):
            assert list(tmp_path.iterdir()) == [], f"a signal at instruction {step} left the lock file"
            step += 1
    claims[-1].__exit__(None, None, None)
    assert step > 20 and list(tmp_path.iterdir()) == []


def test_a_stop_signal_at_any_instruction_of_the_check_that_a_file_can_be_written_leaves_nothing(
    tmp_path: Path,
) -> None:
    """The check makes the file's temporary file and removes it: a stop signal never leaves it behind."""
    step = 1
    with signals.handling(signals.INTERRUPTING_SIGNALS, _raise_interrupt):
        while _signalled_at(step, signal.SIGINT, lambda: files.check_writable(tmp_path / "digits.npz")):
            assert list(tmp_path.iterdir()) == [], f"a signal at instruction {step} left a file"
            step += 1
    assert step > 20 and list(tmp_path.iterdir()) == []


def _interrupt(*_args: object, **_kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("stopped_in", ["the planning's checks", "the command, as it starts its progress"])
def test_a_run_stopped_after_its_plan_made_its_folders_removes_them(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch, stopped_in: str
) -> None:
    """Planning makes the output folders (to look into them); a stop signal before the run begins writing (as it
    checks the files in its way, or says what it starts) must not leave them, empty, behind."""
    if stopped_in == "the planning's checks":
        monkeypatch.setattr(writers, "refuse_writing_over", _interrupt)
    else:
        monkeypatch.setattr(cli, "progress", _interrupt)
    args = ["generate", "--generator", str(tiny_onnx), "-n", "5", "--out", str(tmp_path / "new" / "deep")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and list(tmp_path.iterdir()) == []


def test_a_stop_signal_after_any_system_call_of_planning_leaves_no_folder_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning makes the output folders (to look into them): a stop signal after any folder is made or looked at
    (where Python runs a signal's handler: as a call into C returns) leaves none of them."""
    calls = 0
    signal_at = 0

    def then_signal(call: Callable) -> Callable:
        def called(*args: object, **kwargs: object) -> object:
            nonlocal calls
            result = call(*args, **kwargs)
            calls += 1
            if calls == signal_at:
                signal.raise_signal(signal.SIGINT)
            return result

        return called

    for name in ("mkdir", "access", "stat", "lstat", "scandir", "listdir"):
        monkeypatch.setattr(os, name, then_signal(getattr(os, name)))
    out = tmp_path / "new" / "deep"
    with signals.handling(signals.INTERRUPTING_SIGNALS, _raise_interrupt):
        while True:
            signal_at += 1
            calls = 0
            try:
                writers.plan_output(out, "npz", N)
            except KeyboardInterrupt:
                assert list(tmp_path.iterdir()) == [], f"a signal after system call {signal_at} left a folder"
                continue
            break
    monkeypatch.undo()
    assert signal_at > 3 and out.is_dir()  # planned in full: the folders stay for the run

"""Interrupted generation: SIGTERM and SIGHUP stop `generate` as Ctrl-C does, and `--resume` finishes
the folder byte for byte as an uninterrupted run would have written it."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from digitgen.runtime import (
    DigitGenerator,
    OtherRunError,
    OutputError,
    Shard,
    generate_files,
    writers,
)
from digitgen.runtime.layout import FORMATS
from digitgen.runtime.png_journal import (
    JOURNAL_NAME,
    MAX_PNG_BYTES,
    Journal,
    holds_recorded,
    recorded_files,
    run_identity,
)
from tests.helpers import default_sigint, write_npz_declaring

N = 40
BATCH = 8
REQUEST = {"digits": [1, 4, 7], "seed": 5, "batch_size": BATCH}


@pytest.fixture(scope="module")
def gen(tiny_onnx: Path) -> DigitGenerator:
    return DigitGenerator.from_path(tiny_onnx, "cpu")


def folder(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden temporary files included) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def journaled(out: Path) -> list[str]:
    """The files a PNG run's journal in ``out`` records, by name."""
    data = (out / JOURNAL_NAME).read_bytes()
    assert data.startswith(b"digitgen png run journal 1\n")
    records = np.frombuffer(data[27 + 32 :], dtype=[("index", "<i8"), ("digest", "S16")])
    by_index = {p.name[:8]: p.name for p in out.glob("*.png")}
    assert all(
        hashlib.blake2b((out / by_index[f"{i:08d}"]).read_bytes(), digest_size=16).digest() == d
        for i, d in records.tolist()
    )
    return sorted(by_index[f"{i:08d}"] for i in records["index"].tolist())


def interrupt_after(batches: int):
    seen = []

    def on_batch(n: int) -> None:
        seen.append(n)
        if len(seen) == batches:
            raise KeyboardInterrupt

    return on_batch


@pytest.fixture(scope="module")
def clean_runs(gen: DigitGenerator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    runs = {}
    for fmt in FORMATS:
        out = tmp_path_factory.mktemp(f"clean-{fmt}")
        generate_files(gen, out, N, fmt, **REQUEST)
        runs[fmt] = folder(out)
    return runs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stop_after", [1, 3, 5])
def test_resume_after_an_interrupt_equals_an_uninterrupted_run(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, fmt: str, stop_after: int
) -> None:
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, fmt, on_batch=interrupt_after(stop_after), **REQUEST)
    left = folder(tmp_path)
    assert not [name for name in left if name.endswith(".part")]
    if fmt == "png":
        assert journaled(tmp_path) == sorted(name for name in left if name != JOURNAL_NAME)
        assert len(left) == stop_after * BATCH + 1  # every complete batch's files and the journal, nothing else
        assert all(clean_runs[fmt][name] == content for name, content in left.items() if name != JOURNAL_NAME)
        with pytest.raises(
            OutputError,
            match=r"; pass --resume to continue an interrupted run of this command, or --overwrite to replace them$",
        ):
            generate_files(gen, tmp_path, N, fmt, **REQUEST)
    else:
        assert left == {}
    generate_files(gen, tmp_path, N, fmt, resume=True, **REQUEST)
    assert folder(tmp_path) == clean_runs[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_replaces_a_damaged_file_and_keeps_the_good_ones(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, fmt: str
) -> None:
    generate_files(gen, tmp_path, N, fmt, **REQUEST)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    damaged = files[len(files) // 2]
    damaged.write_bytes(damaged.read_bytes()[:-7])
    killed = files[0].with_name(f".{files[0].name}.part")  # what a SIGKILL mid-write leaves
    killed.write_bytes(files[0].read_bytes()[:50])
    good = [p for p in files if p != damaged]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in good}
    generate_files(gen, tmp_path, N, fmt, resume=True, **REQUEST)
    assert folder(tmp_path) == clean_runs[fmt]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in good} == stamps  # kept, not rewritten


def test_resume_replaces_every_file_a_power_cut_left_empty(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict
) -> None:
    """PNGs are not synced one by one: after a power cut every file may be there, and empty. Their digits are set
    aside (in an unnamed file) until every file has been checked, then written."""
    generate_files(gen, tmp_path, N, "png", **REQUEST)
    for path in tmp_path.iterdir():
        path.write_bytes(b"")
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert folder(tmp_path) == clean_runs["png"]


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_resume_replaces_a_file_damaged_inside(gen: DigitGenerator, tmp_path: Path, clean_runs: dict, fmt: str) -> None:
    """A changed byte inside the pixels: a PNG chunk's or an NPZ member's CRC no longer holds."""
    generate_files(gen, tmp_path, N, fmt, **REQUEST)
    damaged = sorted(tmp_path.iterdir())[5 if fmt == "png" else 0]
    data = bytearray(damaged.read_bytes())
    data[60 if fmt == "png" else len(data) // 3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    generate_files(gen, tmp_path, N, fmt, resume=True, **REQUEST)
    assert folder(tmp_path) == clean_runs[fmt]


NOT_OURS = {"a .npy array": b"\x93NUMPY\x01\x00", "notes": b"my notes\n"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("content", NOT_OURS.values(), ids=NOT_OURS.keys())
def test_resume_refuses_a_file_that_does_not_begin_as_its_format(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, fmt: str, content: bytes
) -> None:
    """A file of an output's name that is not of its kind at all (no run wrote it) is the user's: kept, not taken
    for a damaged output."""
    names = sorted(clean_runs[fmt])
    theirs = tmp_path / names[len(names) // 2]
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_bytes(content)
    with pytest.raises(OtherRunError, match=rf"^{re.escape(str(theirs))} is not an? (PNG|NPZ|IDX) file, so no run"):
        generate_files(gen, tmp_path, N, fmt, resume=True, **REQUEST)
    assert theirs.read_bytes() == content


OTHER_RUNS = {"another seed": {**REQUEST, "seed": 6}, "other labels": {**REQUEST, "digits": [2]}}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("other", OTHER_RUNS, ids=list(OTHER_RUNS))
def test_resume_refuses_to_replace_another_runs_complete_files(
    gen: DigitGenerator, tmp_path: Path, fmt: str, other: str
) -> None:
    """A typo in --seed or --digits must not turn --resume into --overwrite: another run's complete files are
    refused, named, and left as they were, and nothing is added."""
    generate_files(gen, tmp_path, N, fmt, **OTHER_RUNS[other])
    before = folder(tmp_path)
    words = (
        r" holds other digits than this command makes \(written with other options or another model\); resume "
        r"with the options of the run that wrote it, or pass --overwrite to replace it$"
    )
    with pytest.raises(OtherRunError, match=words):
        generate_files(gen, tmp_path, N, fmt, resume=True, **REQUEST)
    assert folder(tmp_path) == before


ARRAY_FORMATS = ("npz", "idx", "mnist")
OTHER_ARRAY_RUNS = {**OTHER_RUNS, "another count": {**REQUEST, "num": N - BATCH}}


@pytest.mark.parametrize("fmt", ARRAY_FORMATS)
@pytest.mark.parametrize("other", OTHER_ARRAY_RUNS, ids=list(OTHER_ARRAY_RUNS))
def test_resume_refuses_another_runs_arrays_before_making_the_digits(
    gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, other: str
) -> None:
    """An IDX or NPZ file says how many digits it holds and begins with the first: a resume with a mistyped option
    makes one digit before it stops, not the whole run's digits."""
    request = {"num": N, **OTHER_ARRAY_RUNS[other]}
    generate_files(gen, tmp_path, request.pop("num"), fmt, **request)
    before = folder(tmp_path)
    calls = made_digits(gen, monkeypatch)
    words = (
        "other digits than this command makes "
        if other != "another count"
        else f"{N - BATCH} digits where this command writes {N};"
    )
    with pytest.raises(OtherRunError, match=f" holds {words}"):
        generate_files(gen, tmp_path, N, fmt, resume=True, **REQUEST)
    assert calls == [1]
    assert folder(tmp_path) == before


def test_resume_refuses_another_runs_test_split_before_making_the_digits(
    gen: DigitGenerator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train pair is this run's, the test pair of another size: refused after each split's first digit."""
    generate_files(gen, tmp_path, N, "mnist", test_count=BATCH, **REQUEST)
    before = folder(tmp_path)
    calls = made_digits(gen, monkeypatch)
    with pytest.raises(
        OtherRunError, match=f"t10k-images-idx3-ubyte holds {BATCH} digits where this command writes {2 * BATCH}; "
    ):
        generate_files(gen, tmp_path, N, "mnist", test_count=2 * BATCH, resume=True, **REQUEST)
    assert calls == [1, 1]
    assert folder(tmp_path) == before


@pytest.mark.parametrize("fmt", ARRAY_FORMATS)
def test_resume_of_this_runs_damaged_arrays_is_not_refused_early(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, fmt: str
) -> None:
    """A file of this run cut short after its first digit, or cut inside it, is damage to replace, not another
    run's; this run's whole files beside it (the images files) are its own: the early look lets both through, and
    the resume ends with the uninterrupted run's folder."""
    for cut in (16 + 28 * 28 + 5, 20):
        generate_files(gen, tmp_path, N, fmt, overwrite=True, **REQUEST)
        for path in (p for p in tmp_path.rglob("*") if p.is_file() and "-images-" not in p.name):
            path.write_bytes(path.read_bytes()[:cut])
        generate_files(gen, tmp_path, N, fmt, resume=True, **REQUEST)
        assert folder(tmp_path) == clean_runs[fmt]


@pytest.mark.parametrize("other", OTHER_RUNS, ids=list(OTHER_RUNS))
def test_a_refused_resume_leaves_damaged_files_for_the_run_that_wrote_them(
    gen: DigitGenerator, tmp_path: Path, other: str
) -> None:
    """A damaged file before another run's first complete one is not replaced, nor removed, by a resume with a
    typo: the folder stays as it was, and the right resume then finishes it."""
    generate_files(gen, tmp_path, N, "png", **OTHER_RUNS[other])
    clean = folder(tmp_path)
    first = sorted(tmp_path.iterdir())[0]
    first.write_bytes(first.read_bytes()[:40])
    before = folder(tmp_path)
    with pytest.raises(OtherRunError, match=r"holds other digits than this command makes .*pass --overwrite"):
        generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert folder(tmp_path) == before
    generate_files(gen, tmp_path, N, "png", resume=True, **OTHER_RUNS[other])
    assert folder(tmp_path) == clean


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_refuses_a_folder_of_a_longer_run(gen: DigitGenerator, tmp_path: Path, fmt: str) -> None:
    """Its first N digits are this run's too (PNG files of the same index and label), but the folder could never
    end as an uninterrupted run of N leaves it."""
    generate_files(gen, tmp_path, N + 5, fmt, **REQUEST)
    before = folder(tmp_path)
    with pytest.raises(OtherRunError) as error:
        generate_files(gen, tmp_path, N, fmt, resume=True, **REQUEST)
    if fmt == "png":
        assert str(error.value) == (
            f"{tmp_path / '00000040_label4.png'} (and 4 more) lies past this command's 40 digits: the folder holds a "
            "run of another count; resume with that run's count, pass --overwrite to replace it, or write to another "
            "folder"
        )
    assert folder(tmp_path) == before


def test_overwrite_and_resume_leave_a_longer_runs_pngs_past_a_shard_as_overwrite_does(
    gen: DigitGenerator, tmp_path: Path
) -> None:
    """A shard replaces only its own digits, with --overwrite alone or with --resume too: the longer run's digits
    past the request are neither refused nor removed."""
    generate_files(gen, tmp_path, N + 5, "png", **{**REQUEST, "seed": 9})
    past = {name: data for name, data in folder(tmp_path).items() if int(name[:8]) >= N}
    for resume in (False, True):
        generate_files(gen, tmp_path, N, "png", shard=Shard(1, 2), overwrite=True, resume=resume, **REQUEST)
        written = folder(tmp_path)
        assert {name: written[name] for name in past} == past
        shard = tmp_path.parent / f"{tmp_path.name}-shard-{resume}"
        generate_files(gen, shard, N, "png", shard=Shard(1, 2), **REQUEST)
        assert all(written[name] == data for name, data in folder(shard).items())


@pytest.mark.parametrize(("extra", "more"), [(1, ""), (2, " (and 1 more)")])
def test_pngs_past_the_count_are_counted(gen: DigitGenerator, tmp_path: Path, extra: int, more: str) -> None:
    generate_files(gen, tmp_path, N + extra, "png", **REQUEST)
    first = re.escape(str(tmp_path / "00000040_label4.png") + more)
    with pytest.raises(OtherRunError, match=f"^{first} lies past this command's 40 digits"):
        generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)


def test_a_refused_resume_removes_the_files_it_had_added(gen: DigitGenerator, tmp_path: Path) -> None:
    """Digits 0-7 this run's, 8-15 missing, 16-39 another run's: the first file passes the check before the run,
    and the files written for 8-15 go again when 16 is refused."""
    generate_files(gen, tmp_path, N, "png", **{**REQUEST, "seed": 6})
    ours = tmp_path.parent / f"{tmp_path.name}-ours"
    generate_files(gen, ours, 8, "png", **REQUEST)  # the same digits [1, 4, 7], so the same names
    for path in sorted(tmp_path.iterdir())[:16]:
        path.unlink()
    for path in ours.iterdir():
        path.rename(tmp_path / path.name)
    before = folder(tmp_path)
    with pytest.raises(OtherRunError, match="00000016_label"):
        generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert folder(tmp_path) == before


def test_resume_of_a_truncated_run_missing_its_first_files(
    gen: DigitGenerator, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The check before the run makes the folder's first file's digit as the run would: at its own index, with
    the run's truncation."""
    request = {**REQUEST, "truncation": 1.0}
    clean = tmp_path_factory.mktemp("clean-truncated")
    generate_files(gen, clean, N, "png", **request)
    generate_files(gen, tmp_path, N, "png", **request)
    for path in sorted(tmp_path.iterdir())[:8]:
        path.unlink()
    generate_files(gen, tmp_path, N, "png", resume=True, **request)
    assert folder(tmp_path) == folder(clean)


def _other_whole_files(folder: Path) -> dict[str, Path]:
    """Whole files under the names of generate's outputs that no run of it wrote: each is someone's, never damage
    that --resume may repair (each member of an NPZ reads back with its CRC; an IDX file is as long as its
    header says)."""
    pickled = np.empty(1, dtype=object)
    pickled[0] = _Touches(folder.parent / f"{folder.name}-unpickled")
    np.savez(folder / "pickled.npz", images=pickled)
    write_npz_declaring(folder / "declaring.npz", (382_653_061, 28, 28))  # 279 GiB said, a kilobyte held
    (folder / "wide-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 3, 32, 32) + bytes(3 * 32 * 32))
    (folder / "float-idx1-ubyte").write_bytes(struct.pack(">II", 0xD01, 3) + bytes(12))
    return {
        "an NPZ of pickled objects": folder / "pickled.npz",
        "an NPZ declaring more than it holds": folder / "declaring.npz",
        "an IDX of 32x32 images": folder / "wide-idx3-ubyte",
        "an IDX of floats": folder / "float-idx1-ubyte",
    }


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [
        ("npz", "an NPZ of pickled objects"),
        ("npz", "an NPZ declaring more than it holds"),
        ("idx", "an IDX of 32x32 images"),
        ("idx", "an IDX of floats"),
    ],
)
def test_resume_refuses_someones_whole_file_of_another_shape_and_never_unpickles_it(
    gen: DigitGenerator, tmp_path: Path, fmt: str, kind: str
) -> None:
    """Not digits of this tool, but whole: refused and left as it was (these had been taken for damage and
    replaced), and an NPZ in the way is data: a pickled object in it is never run."""
    made = tmp_path / "made"
    made.mkdir()
    source = _other_whole_files(made)[kind]
    out = tmp_path / "out"
    out.mkdir()
    name = "digits.npz" if fmt == "npz" else "train-images-idx3-ubyte" if "32x32" in kind else "train-labels-idx1-ubyte"
    (out / name).write_bytes(source.read_bytes())
    with pytest.raises(OtherRunError, match=r"holds other digits than this command makes .*pass --overwrite"):
        generate_files(gen, out, N, fmt, resume=True, **REQUEST)
    assert (out / name).read_bytes() == source.read_bytes()
    assert not (tmp_path / "made-unpickled").exists()


@pytest.mark.parametrize(
    ("fmt", "shard", "name", "kind"),
    [
        ("png", Shard(0, 1), "00000000_label0.png", "a PNG"),
        ("npz", Shard(0, 1), "digits.npz", "an NPZ"),
        ("idx", Shard(0, 1), "train-labels-idx1-ubyte", "an IDX"),
        ("npz", Shard(0, 2), "digitgen-npz-run-00000-of-00002", "a run record"),
    ],
)
def test_resume_refuses_a_file_that_does_not_begin_as_one_of_its_kind(
    gen: DigitGenerator, tmp_path: Path, fmt: str, shard: Shard, name: str, kind: str
) -> None:
    """Notes saved under an output's name: no run wrote them, so they are not taken for a damaged output."""
    (tmp_path / name).write_text("my notes\n")
    with pytest.raises(OtherRunError) as refused:
        generate_files(gen, tmp_path, N, fmt, resume=True, shard=shard, **REQUEST)
    assert str(refused.value) == (
        f"{tmp_path / name} is not {kind} file, so no run of this command wrote it; move it, or pass --overwrite "
        "to replace it"
    )
    assert (tmp_path / name).read_text() == "my notes\n"


def test_resume_refuses_an_encrypted_npz_as_someones_whole_file(gen: DigitGenerator, tmp_path: Path) -> None:
    """zipfile cannot check the CRC of an encrypted member without its password: the archive is someone's, whole
    as far as anyone here can tell, and never taken for damage."""
    with zipfile.ZipFile(tmp_path / "digits.npz", "w") as archive:
        archive.writestr("images.npy", b"secret")
    data = bytearray((tmp_path / "digits.npz").read_bytes())
    central = data.rindex(b"PK\x01\x02")
    data[6] |= 1  # the encrypted flag, in the local header and in the central directory
    data[central + 8] |= 1
    (tmp_path / "digits.npz").write_bytes(bytes(data))
    with pytest.raises(OtherRunError, match=r"holds other digits than this command makes .*pass --overwrite"):
        generate_files(gen, tmp_path, N, "npz", resume=True, **REQUEST)
    assert (tmp_path / "digits.npz").read_bytes() == bytes(data)


class _Touches:
    """Unpickled, it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("fmt", ["idx", "npz"])
def test_resuming_a_shard_keeps_its_run_record_or_replaces_a_damaged_one(
    gen: DigitGenerator, tmp_path: Path, fmt: str
) -> None:
    clean = tmp_path / "clean"
    generate_files(gen, clean, N, fmt, shard=Shard(1, 3), **REQUEST)
    out = tmp_path / "resumed"
    generate_files(gen, out, N, fmt, shard=Shard(1, 3), **REQUEST)
    record = out / f"digitgen-{fmt}-run-00001-of-00003"
    stamp = record.stat().st_mtime_ns
    generate_files(gen, out, N, fmt, shard=Shard(1, 3), resume=True, **REQUEST)
    assert record.stat().st_mtime_ns == stamp  # the same run's: kept as it was
    record.write_bytes(record.read_bytes()[:20])  # cut short
    generate_files(gen, out, N, fmt, shard=Shard(1, 3), resume=True, **REQUEST)
    assert folder(out) == folder(clean)


@pytest.mark.parametrize("fmt", ["png", "idx", "npz"])
@pytest.mark.parametrize(
    ("count", "other"), [(N, {"seed": 9}), (N, {"digits": [3]}), (2 * N, {})], ids=["seed", "labels", "longer"]
)
def test_an_interrupted_overwrite_continues_with_overwrite_and_resume(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, fmt: str, count: int, other: dict
) -> None:
    generate_files(gen, tmp_path, count, fmt, **{**REQUEST, **other})
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, fmt, overwrite=True, on_batch=interrupt_after(2), **REQUEST)
    with pytest.raises(OtherRunError):  # the earlier run's files the overwrite had not reached
        generate_files(gen, tmp_path, N, fmt, resume=True, **REQUEST)
    generate_files(gen, tmp_path, N, fmt, overwrite=True, resume=True, **REQUEST)
    assert folder(tmp_path) == clean_runs[fmt]


def _generate(out: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "digitgen", "generate", "--out", str(out), "--seed", "3", *args]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )


def _wait_for_progress(proc: subprocess.Popen) -> None:
    """Block until the command has checked its request and started generating."""
    line = proc.stderr.readline()
    assert line.startswith("generating: ") and line.endswith(" to do\n"), line + proc.stderr.read()


# Long enough that each run is still generating when the signal arrives (the shipped model, 2 cores:
# minutes of work), small enough that npz and grid fit in memory.
SIZES = {"png": 200_000, "grid": 10_000, "npz": 200_000, "idx": 200_000, "mnist": 200_000}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_terminating_signals_leave_what_ctrl_c_leaves(tmp_path: Path, fmt: str, signum: int) -> None:
    batch = "1" if fmt == "grid" else "64"
    proc = _generate(tmp_path, "-n", str(SIZES[fmt]), "--format", fmt, "--batch-size", batch)
    _wait_for_progress(proc)
    time.sleep(0.5)
    if fmt == "png":  # a loaded machine may not have written a file yet: the test needs some to look at
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob("*.png")) and time.monotonic() < deadline:
            time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        "Error: interrupted; any file it wrote is complete, none is partial; the same command with --resume continues"
    )
    assert "Traceback" not in stderr and stdout == ""
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    if fmt == "png":  # whole PNGs, and the run's journal (which a signal may catch as it begins it)
        pngs = [p for p in left if p.name != JOURNAL_NAME]
        assert pngs and all(p.suffix == ".png" and p.stat().st_size > 60 for p in pngs)
    else:
        assert left == []


def _ignoring_sighup() -> None:
    """``preexec_fn`` of a child started as ``nohup`` starts it: SIGHUP ignored."""
    default_sigint()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's signals from /proc (Linux)")
def test_a_command_started_ignoring_sighup_as_nohup_does_goes_on_through_it(tmp_path: Path) -> None:
    """Closing the terminal of a ``nohup digitgen ...`` must not stop it; SIGTERM still does."""
    command = [sys.executable, "-m", "digitgen", "generate", "--out", str(tmp_path), "-n", "200000", "--format", "npz"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ignoring_sighup
    )
    _wait_for_progress(proc)
    proc.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=2)  # still generating
    ignored = next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if "SigIgn" in line)
    assert int(ignored.split()[1], 16) >> (signal.SIGHUP - 1) & 1  # still ignored, not caught
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1].startswith("Error: interrupted; "), stderr


def test_sigterm_then_resume_gives_the_uninterrupted_folder(tmp_path: Path) -> None:
    args = ("-n", "2000", "--digits", "3,8", "--batch-size", "64")
    proc = _generate(tmp_path / "resumed", *args)
    _wait_for_progress(proc)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "resumed").glob("*.png"))) < 200:  # PNGs only: not the journal, nor a lock
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before 200 PNGs"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    interrupted = len(list((tmp_path / "resumed").glob("*.png")))
    # every journaled file there with its digest; the signal may come between a file's rename and its record
    written, recorded = {p.name for p in (tmp_path / "resumed").glob("*.png")}, set(journaled(tmp_path / "resumed"))
    assert recorded <= written and len(written - recorded) <= 1
    assert 200 <= interrupted < 2000
    resumed = _generate(tmp_path / "resumed", *args, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert f"kept {interrupted:,} complete files of the earlier run" in stdout
    clean = _generate(tmp_path / "clean", *args)
    assert clean.wait(timeout=300) == 0
    assert folder(tmp_path / "resumed") == folder(tmp_path / "clean")


def test_overwrite_with_fewer_png_digits_leaves_this_runs_folder_which_then_resumes(
    gen: DigitGenerator, tmp_path: Path
) -> None:
    generate_files(gen, tmp_path / "fewer", 10, seed=2)
    generate_files(gen, tmp_path / "out", 20, seed=1)
    generate_files(gen, tmp_path / "out", 10, seed=2, overwrite=True)
    assert folder(tmp_path / "out") == folder(tmp_path / "fewer")
    generate_files(gen, tmp_path / "out", 10, seed=2, resume=True)
    assert folder(tmp_path / "out") == folder(tmp_path / "fewer")


# --- the journal: files an interrupted run recorded are kept without making their digits again ----------------


def made_digits(gen: DigitGenerator, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many digits each model call of ``gen`` makes from now on."""
    calls: list[int] = []
    run = gen.run

    def counted(noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
        calls.append(len(labels))
        return run(noise, labels)

    monkeypatch.setattr(gen, "run", counted)
    return calls


def test_resume_keeps_the_journaled_files_without_making_their_digits_again(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(3), **REQUEST)
    calls = made_digits(gen, monkeypatch)
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert calls == [1, BATCH, BATCH]  # the first file's digit (is the folder this run's?), then the 2 batches left
    assert folder(tmp_path) == clean_runs["png"]  # the journal gone with the run


def test_a_run_interrupted_twice_resumes_on_the_records_of_both(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second run continues the first's journal (no second header among its records)."""
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(2), **REQUEST)
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", resume=True, on_batch=interrupt_after(4), **REQUEST)
    calls = made_digits(gen, monkeypatch)
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert calls == [1, BATCH]  # the first file's digit, then the last batch: four were on record
    assert folder(tmp_path) == clean_runs["png"]


def test_an_overwrite_begins_its_own_journal_over_another_runs(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run's journal is replaced, not appended to: the resumed overwrite keeps its own files on record."""
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(2), **{**REQUEST, "seed": 6})
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", overwrite=True, on_batch=interrupt_after(3), **REQUEST)
    calls = made_digits(gen, monkeypatch)
    generate_files(gen, tmp_path, N, "png", overwrite=True, resume=True, **REQUEST)
    assert calls == [BATCH, BATCH]  # the three batches on record kept, the two left made
    assert folder(tmp_path) == clean_runs["png"]


def test_a_pipe_where_the_journal_goes_is_refused_and_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / JOURNAL_NAME)
    with pytest.raises(OutputError, match="is not a journal of digitgen's, which a PNG run keeps there; move it"):
        Journal(tmp_path / JOURNAL_NAME, run_identity("model", "noise", 1))


def test_a_recorded_digest_is_read_up_to_the_largest_file_a_run_keeps(tmp_path: Path) -> None:
    for size, kept in ((MAX_PNG_BYTES, True), (MAX_PNG_BYTES + 1, False)):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        (tmp_path / "digit.png").write_bytes(data)
        assert holds_recorded(tmp_path / "digit.png", hashlib.blake2b(data, digest_size=16).digest()) is kept


def test_a_journaled_file_damaged_or_changed_since_is_checked_by_its_digit(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(4), **REQUEST)
    damaged, changed = sorted(tmp_path.glob("*.png"))[BATCH + 3], sorted(tmp_path.glob("*.png"))[3 * BATCH]
    damaged.write_bytes(damaged.read_bytes()[:-5])
    changed.write_bytes(clean_runs["png"][sorted(tmp_path.glob("*.png"))[0].name])  # a whole PNG, another digit
    calls = made_digits(gen, monkeypatch)
    with pytest.raises(OtherRunError, match=re.escape(changed.name)):
        generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert calls == [1, BATCH, BATCH]  # batches 2 and 4 made again, the changed file then refused
    changed.write_bytes(clean_runs["png"][changed.name][:-5])  # damaged after all: replaced
    calls.clear()
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert folder(tmp_path) == clean_runs["png"]
    assert calls == [1, BATCH, BATCH, BATCH]  # batches 2, 4 and 5: the journal had records for batches 1 to 4


@pytest.mark.parametrize("another_run", [True, False])
def test_a_journal_of_another_run_or_torn_keeps_nothing_on_its_record(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, monkeypatch: pytest.MonkeyPatch, another_run: bool
) -> None:
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(2), **REQUEST)
    journal = tmp_path / JOURNAL_NAME
    header = len(b"digitgen png run journal 1\n")
    data = journal.read_bytes()
    journal.write_bytes(data[:header] + bytes(32) + data[header + 32 :] if another_run else data[: header - 3])
    calls = made_digits(gen, monkeypatch)
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert calls == [1] + [BATCH] * (N // BATCH) and folder(tmp_path) == clean_runs["png"]


@pytest.mark.parametrize(
    ("resumed_between", "made"),
    [(False, [1, BATCH, BATCH, BATCH, BATCH]), (True, [1, BATCH])],
    ids=["resumed at once", "resumed, interrupted, resumed"],
)
def test_a_torn_last_record_loses_only_its_file(
    gen: DigitGenerator,
    tmp_path: Path,
    clean_runs: dict,
    monkeypatch: pytest.MonkeyPatch,
    resumed_between: bool,
    made: list[int],
) -> None:
    """A run resumed after it continues the journal after its last whole record: records appended after the torn
    part had been read out of step (indices of millions), so that the last resume had kept nothing on them."""
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(2), **REQUEST)
    journal = tmp_path / JOURNAL_NAME
    journal.write_bytes(journal.read_bytes()[:-5])
    if resumed_between:
        with pytest.raises(KeyboardInterrupt):
            generate_files(gen, tmp_path, N, "png", resume=True, on_batch=interrupt_after(4), **REQUEST)
    calls = made_digits(gen, monkeypatch)
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert calls == made and folder(tmp_path) == clean_runs["png"]


class _DiskFullAfter:
    """A file that takes ``room`` bytes, then fails as a full disk does (after writing what fits)."""

    def __init__(self, file: BinaryIO, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: bytes) -> int:
        taken = self.file.write(data[: self.room])
        self.room -= taken
        if taken < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return taken

    def __getattr__(self, name: str) -> object:
        return getattr(self.file, name)


def _journal_room(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    opened = Path.open

    def open_journal(path: Path, *args: object, **kwargs: object) -> object:
        file = opened(path, *args, **kwargs)
        return _DiskFullAfter(file, room) if path.name == JOURNAL_NAME else file

    monkeypatch.setattr(Path, "open", open_journal)


def test_a_journal_the_disk_cannot_take_stops_at_its_last_whole_record_and_the_run_goes_on(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It only saves a later resume time: a full disk had ended the run with a bare "No space left on device"."""
    header = len(b"digitgen png run journal 1\n") + 32
    with monkeypatch.context() as full:
        _journal_room(full, header + 2 * BATCH * 24 + 10)  # two batches' records, then 10 bytes of the next
        with pytest.raises(KeyboardInterrupt):
            generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(4), **REQUEST)
    assert len((tmp_path / JOURNAL_NAME).read_bytes()) == header + 2 * BATCH * 24
    calls = made_digits(gen, monkeypatch)
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert calls == [1, BATCH, BATCH, BATCH] and folder(tmp_path) == clean_runs["png"]


def test_a_journal_that_cannot_even_be_opened_is_left_as_it_was(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too many open files, say: the earlier run's records must not be cut to nothing."""
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(2), **REQUEST)
    records = (tmp_path / JOURNAL_NAME).read_bytes()
    opened = Path.open

    def no_more_files(path: Path, *args: object, **kwargs: object) -> object:
        if path.name == JOURNAL_NAME and args and args[0] == "r+b":
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return opened(path, *args, **kwargs)

    with monkeypatch.context() as limited:
        limited.setattr(Path, "open", no_more_files)
        with pytest.raises(KeyboardInterrupt):
            generate_files(gen, tmp_path, N, "png", resume=True, on_batch=interrupt_after(3), **REQUEST)
    assert (tmp_path / JOURNAL_NAME).read_bytes() == records
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert folder(tmp_path) == clean_runs["png"]


def test_a_complete_folder_resumed_on_a_full_disk_is_kept_and_left_as_it_was(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, data in clean_runs["png"].items():
        (tmp_path / name).write_bytes(data)
    _journal_room(monkeypatch, 0)
    calls = made_digits(gen, monkeypatch)
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert calls == [1] + [BATCH] * (N // BATCH)  # each file checked by its digit, none written
    assert folder(tmp_path) == clean_runs["png"]  # no journal begun and left behind


def test_a_folder_without_room_for_the_repairs_is_named_and_its_files_kept(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, data in clean_runs["png"].items():
        (tmp_path / name).write_bytes(data)
    damaged = sorted(tmp_path.glob("*.png"))[5]
    damaged.write_bytes(damaged.read_bytes()[:-5])
    before = folder(tmp_path)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(writers.tempfile, "TemporaryFile", lambda dir: (_ for _ in ()).throw(full))
    with pytest.raises(OutputError) as refused:
        generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert str(refused.value) == (
        f"cannot write in {tmp_path} (the digits that replace its damaged files wait in a temporary file there until "
        "every file has been checked): No space left on device"
    )
    after = folder(tmp_path)
    assert after.pop(JOURNAL_NAME) and after == before  # the files as they were, and a journal of the checks


def test_someones_file_where_the_journal_goes_is_refused_and_kept(gen: DigitGenerator, tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_text("my notes")
    with pytest.raises(OutputError, match="is not a journal of digitgen's, which a PNG run keeps there; move it"):
        generate_files(gen, tmp_path, N, "png", **REQUEST)
    assert folder(tmp_path) == {JOURNAL_NAME: b"my notes"}


def test_each_png_shard_keeps_a_journal_of_its_own(gen: DigitGenerator, tmp_path: Path, clean_runs: dict) -> None:
    for index in (0, 1):
        with pytest.raises(KeyboardInterrupt):
            generate_files(gen, tmp_path, N, "png", shard=Shard(index, 2), on_batch=interrupt_after(1), **REQUEST)
    assert {p.name for p in tmp_path.glob(".*")} == {f"{JOURNAL_NAME}-00000-of-00002", f"{JOURNAL_NAME}-00001-of-00002"}
    for index in (0, 1):
        generate_files(gen, tmp_path, N, "png", shard=Shard(index, 2), resume=True, **REQUEST)
    assert folder(tmp_path) == clean_runs["png"]


def test_an_unsharded_run_that_finishes_a_folder_removes_its_shards_journals(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict
) -> None:
    for index in (0, 1):
        with pytest.raises(KeyboardInterrupt):
            generate_files(gen, tmp_path, N, "png", shard=Shard(index, 2), on_batch=interrupt_after(1), **REQUEST)
    (tmp_path / f"{JOURNAL_NAME}-notes-of-mine").write_text("not a journal")  # someone's: kept
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert folder(tmp_path) == {**clean_runs["png"], f"{JOURNAL_NAME}-notes-of-mine": b"not a journal"}


def test_the_journal_reads_back_every_digest_it_recorded_to_the_byte(tmp_path: Path) -> None:
    """A digest that ends in zero bytes among them (a fixed-length byte string of numpy's would drop them)."""
    path, identity = tmp_path / JOURNAL_NAME, bytes(range(32))
    digests = [bytes(16), b"\x01" * 15 + b"\x00", bytes(range(1, 17)), b"\x00" + b"\xff" * 15]
    journal = Journal(path, identity)
    journal.record([5, 7], digests[:2])
    journal.record([6, 7, 9], [digests[2], digests[0], digests[3]])  # index 7 again: its last digest counts
    journal.close(remove=False)
    recorded = recorded_files(path, identity)
    assert recorded.digests_of(0, 100) == {5: digests[0], 6: digests[2], 7: digests[0], 9: digests[3]}
    assert recorded.digests_of(6, 9) == {6: digests[2], 7: digests[0]}
    assert recorded_files(path, bytes(32)) is None  # another run's


def test_a_journaled_index_with_a_second_file_of_another_label_is_checked_and_refused(
    gen: DigitGenerator, tmp_path: Path, clean_runs: dict
) -> None:
    """A file of another label beside a journaled one is no file this run writes: refused as without a journal."""
    with pytest.raises(KeyboardInterrupt):
        generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(2), **REQUEST)
    ours = sorted(tmp_path.glob("*.png"))[3]
    stranger = ours.with_name(ours.name[:8] + "_label9.png")
    stranger.write_bytes(ours.read_bytes())
    with pytest.raises(OtherRunError, match=re.escape(stranger.name)):
        generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    stranger.unlink()
    generate_files(gen, tmp_path, N, "png", resume=True, **REQUEST)
    assert folder(tmp_path) == clean_runs["png"]


def test_a_journal_begun_without_room_for_its_header_is_not_left_behind(
    gen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as full:
        _journal_room(full, 10)  # not even the header
        with pytest.raises(KeyboardInterrupt):
            generate_files(gen, tmp_path, N, "png", on_batch=interrupt_after(2), **REQUEST)
    assert not (tmp_path / JOURNAL_NAME).exists()

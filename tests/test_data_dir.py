"""A wrong --data-dir creates nothing, downloads nothing unless asked, and says in one line where MNIST is."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from digitgen.cli import main
from digitgen.runtime.idx import MNIST_FILES, mnist_not_found_message
from digitgen.training.data import MnistTensors, load_mnist
from digitgen.training.errors import DatasetNotFoundError
from tests.helpers import write_tiny_mnist

TINY = ("--batch-size", "16", "--latent-dim", "8", "--device", "cpu", "--steps", "1")


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A folder whose ``datasets/`` child is the MNIST root: ``shared`` itself is one level too high."""
    write_tiny_mnist(tmp_path / "shared" / "datasets")
    return tmp_path / "shared"


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(root: Path) -> str:
        raise AssertionError(f"a download into {root} was attempted without --download")

    monkeypatch.setattr("digitgen.training.data._try_download", refuse)


def _run(*args: object) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result.exit_code, result.output.strip().splitlines()


def _assert_one_line_naming(lines: list[str], looked_in: Path, hint: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: MNIST not found")
    assert all(name in lines[0] for name in MNIST_FILES)
    assert f"{looked_in}/" in lines[0]
    assert lines[0].endswith(hint), lines[0]


@pytest.mark.usefixtures("no_download")
@pytest.mark.parametrize(
    "command",
    [
        ("train", "--out", "{tmp}/run", *TINY),
        ("train-classifier", "--out", "{tmp}/classifier.onnx", "--epochs", "1"),
        ("evaluate", "--num-samples", "100"),
    ],
    ids=["train", "train-classifier", "evaluate"],
)
def test_one_level_too_high_names_the_root_below_and_creates_nothing(
    shared: Path, tmp_path: Path, command: tuple[str, ...]
) -> None:
    before = _tree(tmp_path)
    code, lines = _run(*(part.format(tmp=tmp_path) for part in command), "--data-dir", shared)
    assert code == 1
    root = shared / "datasets"
    _assert_one_line_naming(lines, shared / "MNIST" / "raw", f"{root}/MNIST/raw/ has them: use --data-dir {root}")
    assert _tree(tmp_path) == before


@pytest.mark.usefixtures("no_download")
@pytest.mark.parametrize(
    ("given", "hint"),
    [
        ("datasets/MNIST", "{root}/MNIST is the MNIST folder itself: use --data-dir {root}"),
        ("datasets/MNIST/raw", "{root}/MNIST/raw is the raw folder itself: use --data-dir {root}"),
    ],
    ids=["mnist-folder", "raw-folder"],
)
def test_one_level_too_low_names_the_root_above(shared: Path, tmp_path: Path, given: str, hint: str) -> None:
    before = _tree(tmp_path)
    root = shared / "datasets"
    code, lines = _run("train", "--data-dir", shared / given, "--out", tmp_path / "run", *TINY)
    assert code == 1
    _assert_one_line_naming(lines, shared / given / "MNIST" / "raw", hint.format(root=root))
    assert _tree(tmp_path) == before


@pytest.mark.usefixtures("no_download")
def test_nothing_nearby_suggests_download(tmp_path: Path) -> None:
    code, lines = _run("train", "--data-dir", tmp_path / "empty", "--out", tmp_path / "run", *TINY)
    assert code == 1
    where_else = "; point --data-dir (or MNIST_ROOT) at the folder that holds MNIST/raw/, or pass --download"
    _assert_one_line_naming(lines, tmp_path / "empty" / "MNIST" / "raw", where_else)
    assert list(tmp_path.iterdir()) == []


def test_download_is_done_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[Path] = []

    def fake_download(root: Path) -> str:
        fetched.append(root)
        write_tiny_mnist(root)
        return ""

    monkeypatch.setattr("digitgen.training.data._try_download", fake_download)
    root = tmp_path / "fresh"
    code, lines = _run("train", "--data-dir", root, "--download", "--out", tmp_path / "run", *TINY)
    assert code == 0, lines
    assert fetched == [root]
    code, lines = _run("train", "--data-dir", root, "--download", "--out", tmp_path / "run2", *TINY)
    assert code == 0, lines
    assert fetched == [root]  # present now: not fetched again


def test_a_failed_download_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    class Offline:  # as torchvision does: the folders first, then the download that fails
        def __init__(self, root: str, train: bool, download: bool) -> None:
            (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            print("Downloading https://example.invalid/mnist/train-images-idx3-ubyte.gz")
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example.invalid/mnist/")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    root = tmp_path / "fresh"
    code, lines = _run("train", "--data-dir", root, "--download", "--out", tmp_path / "run", *TINY)
    assert code == 1
    _assert_one_line_naming(
        lines,
        root / "MNIST" / "raw",
        "(download failed: Error downloading train-images-idx3-ubyte.gz: Tried https://example.invalid/mnist/)",
    )
    assert not root.exists()  # the folders made for the download are gone with it
    (root / "MNIST").mkdir(parents=True)  # a folder that was there stays
    assert _run("train", "--data-dir", root, "--download", "--out", tmp_path / "run", *TINY)[0] == 1
    assert [p.name for p in root.iterdir()] == ["MNIST"] and list((root / "MNIST").iterdir()) == []


@pytest.mark.parametrize(
    ("command", "swapped"),
    [
        (("train", "--out", "{tmp}/run", *TINY), "train-images-idx3-ubyte"),
        (("train", "--out", "{tmp}/run", *TINY), "train-labels-idx1-ubyte"),
        (("train-classifier", "--out", "{tmp}/classifier.onnx", "--epochs", "1"), "t10k-images-idx3-ubyte"),
    ],
    ids=["train-labels-as-images", "train-images-as-labels", "classifier-test-labels-as-images"],
)
def test_an_mnist_file_of_the_other_kind_is_one_line(tmp_path: Path, command: tuple[str, ...], swapped: str) -> None:
    root = write_tiny_mnist(tmp_path / "data")
    raw = root / "MNIST" / "raw"
    other = (
        swapped.replace("images-idx3", "labels-idx1")
        if "images" in swapped
        else swapped.replace("labels-idx1", "images-idx3")
    )
    (raw / swapped).write_bytes((raw / other).read_bytes())
    args = [part.format(tmp=tmp_path) for part in command] + ["--data-dir", str(root)]
    result = CliRunner().invoke(main, args)
    kind = "images" if "images" in swapped else "labels"
    assert result.exit_code == 1 and result.output.startswith(
        f"Error: {raw / swapped} is not an MNIST IDX file of {kind}"
    )
    assert len(result.output.splitlines()) == 1


@pytest.mark.usefixtures("no_download")
def test_the_library_downloads_only_when_asked(tmp_path: Path) -> None:
    """``load_mnist``'s own default, as the CLI's: nothing fetched, nothing created."""
    with pytest.raises(DatasetNotFoundError):
        load_mnist(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError):
        load_mnist(tmp_path / "empty", train=False)
    assert list(tmp_path.iterdir()) == []


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, writes: bool) -> list[tuple[str, bool]]:
    """torchvision's MNIST replaced by one that records where and whether it was asked to download, prints a line
    as torchvision does, and writes a tiny MNIST there (``writes``) or nothing."""
    import torchvision.datasets

    asked: list[tuple[str, bool]] = []

    class Fetcher:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            asked.append((root, download))
            print(f"Downloading https://example.invalid/mnist/ to {root}")
            if writes and download:
                write_tiny_mnist(Path(root))

    monkeypatch.setattr(torchvision.datasets, "MNIST", Fetcher)
    return asked


def test_a_download_goes_to_the_root_and_prints_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asked = _fake_torchvision(monkeypatch, writes=True)
    root = tmp_path / "fresh"
    data = load_mnist(root, download=True)
    assert asked == [(str(root), True)] and len(data.images) == len(data.labels) > 0
    assert capsys.readouterr().out == ""  # torchvision's URL lines are kept out


def test_a_download_that_leaves_the_files_missing_says_so_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_torchvision(monkeypatch, writes=False)
    root = tmp_path / "fresh"
    with pytest.raises(DatasetNotFoundError) as caught:
        load_mnist(root, download=True)
    assert str(caught.value) == mnist_not_found_message(root)


def test_the_data_fingerprint_is_the_images_then_the_labels_as_little_endian_int64() -> None:
    """The same on any machine: the labels' bytes do not depend on the platform's integer width or order."""
    images = torch.arange(2 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 28, 28)
    labels = torch.tensor([3, 7])
    expected = hashlib.sha256(images.numpy().tobytes() + np.array([3, 7], dtype="<i8").tobytes()).hexdigest()
    assert MnistTensors(images, labels).sha256() == expected
    assert MnistTensors(images, labels.to(torch.int32)).sha256() == expected


def test_a_folder_in_place_of_an_mnist_file_is_named_as_one_not_as_missing(tmp_path: Path) -> None:
    raw = write_tiny_mnist(tmp_path) / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte").mkdir()
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (raw / name).unlink()
    message = mnist_not_found_message(tmp_path)
    assert message.endswith(
        f"looked for in {raw}/ (missing: train-labels-idx1-ubyte, t10k-images-idx3-ubyte; "
        "not files: t10k-labels-idx1-ubyte)"
    ), message


def test_none_of_the_four_files_is_one_plain_sentence(tmp_path: Path) -> None:
    assert mnist_not_found_message(tmp_path) == (
        "MNIST not found: the four uncompressed IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte are looked for in {tmp_path}/MNIST/raw/"
    )


@pytest.mark.parametrize("command", [("evaluate",), ("train", "--steps", "1", "--out", "run")])
def test_a_bad_mnist_root_from_the_environment_is_named_as_the_environment_s(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """The user set MNIST_ROOT, not --data-dir: the refusal names what they set."""
    (tmp_path / "notes.txt").write_text("not a folder")
    runner = CliRunner()
    from_env = runner.invoke(main, list(command), env={"MNIST_ROOT": str(tmp_path / "notes.txt")})
    assert from_env.exit_code == 2
    assert from_env.output.strip() == (
        f"Error: Invalid value for the environment's MNIST_ROOT (read as --data-dir): Directory "
        f"'{tmp_path / 'notes.txt'}' is a file. (see --help)"
    )
    given = runner.invoke(main, [*command, "--data-dir", str(tmp_path / "notes.txt")])
    assert given.output.strip().startswith("Error: Invalid value for '--data-dir': Directory ")


@pytest.mark.usefixtures("no_download")
def test_mnist_kept_compressed_is_named_with_how_to_unpack_it(tmp_path: Path) -> None:
    raw = write_tiny_mnist(tmp_path / "data") / "MNIST" / "raw"
    for name in MNIST_FILES[:2]:  # the train pair as downloaded, the test pair unpacked
        (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
        (raw / name).unlink()
    code, lines = _run("train", "--data-dir", tmp_path / "data", "--out", tmp_path / "run", *TINY)
    assert code == 1
    packed = ", ".join(f"{name}.gz" for name in MNIST_FILES[:2])
    _assert_one_line_naming(
        lines, raw, f"; {raw}/ holds {packed}, compressed: unpack them there (gunzip -k {raw}/*.gz)"
    )
    subprocess.run(["gunzip", "-k", *raw.glob("*.gz")], check=True)  # the hint, followed
    assert _run("train", "--data-dir", tmp_path / "data", "--out", tmp_path / "run", *TINY)[0] == 0

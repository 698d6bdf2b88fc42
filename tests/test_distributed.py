"""torchrun with two CPU processes (gloo): identical weights on both ranks, exact resume, export."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from digitgen.export.onnx_export import export_generator
from tests.conftest import REPO
from tests.helpers import free_port

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def torchrun(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "cli.py"),
        "train",
        *map(str, args),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def test_two_process_training_agrees_resumes_and_exports(tmp_path: Path, tiny_mnist: Path) -> None:
    common = ("--data-dir", tiny_mnist, "--batch-size", 8, "--device", "cpu", "--checkpoint-every", 3)
    straight = torchrun(*common, "--out", tmp_path / "straight", "--steps", 6)
    assert "distributed: 2 processes, effective batch 16 (2 x 8)" in straight.stderr
    assert "generator weights identical on all 2 ranks" in straight.stderr
    assert "note:" not in straight.stderr  # a fresh run resumes nothing, saved by no other number of processes

    torchrun(*common, "--out", tmp_path / "resumed", "--steps", 3)
    resumed = torchrun(
        *common, "--out", tmp_path / "resumed", "--steps", 6, "--resume", tmp_path / "resumed" / "checkpoint.pt"
    )
    assert "note:" not in resumed.stderr  # saved by two, resumed by two
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and len(a["rng"]["noise"]) == 2
    for part in ("generator", "generator_ema", "discriminator"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])

    report = export_generator(tmp_path / "straight" / "checkpoint.pt", tmp_path / "g.onnx")
    assert report.passed and (tmp_path / "g.onnx").is_file()


@pytest.mark.skipif(fcntl is None, reason="run directories are locked with flock, which Windows lacks")
def test_a_run_directory_in_use_stops_every_process_with_the_reason(tmp_path: Path, tiny_mnist: Path) -> None:
    """Every process looks before any work, and all stop, none waiting for another."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = torchrun("--data-dir", tiny_mnist, "--out", run_dir, "--steps", 2, "--device", "cpu", check=False)
    finally:
        os.close(held)
    assert result.returncode != 0
    assert f"Error: another run is training in {run_dir} now" in result.stderr, result.stderr[-3000:]
    assert list(run_dir.iterdir()) == []


def _on_each_process(rank: int, port: int, work: Callable[..., object], args: tuple, outcomes: dict) -> None:
    """``work(rank, *args)`` on one of two gloo processes: what it returns, or its error as "Type: message"."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        outcomes[rank] = work(rank, *args)
    except Exception as exc:
        outcomes[rank] = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()


def _on_two_processes(work: Callable[..., object], *args: object) -> dict[int, object]:
    """What ``work(rank, *args)`` gives on each of two processes of a distributed run (``work``: a module function)."""
    import torch.multiprocessing as mp

    outcomes = mp.Manager().dict()
    mp.spawn(_on_each_process, args=(free_port(), work, args, outcomes), nprocs=2, join=True)
    return dict(outcomes)


def _main_fails_first(rank: int, kind: str) -> object:
    from digitgen.training.distributed import DistContext, on_main_first
    from digitgen.training.errors import TrainingError

    def work() -> str:
        if kind == "os":  # not one of the package's own errors: a folder it cannot make, say
            raise FileNotFoundError(2, "No such file or directory", "/proc/run")
        raise TrainingError("the first process's reason")

    return on_main_first(DistContext(rank, 2), torch.device("cpu"), work, "the others' words")


@pytest.mark.parametrize(
    ("kind", "first"),
    [
        ("training", "TrainingError: the first process's reason"),
        ("os", "FileNotFoundError: [Errno 2] No such file or directory: '/proc/run'"),
    ],
)
def test_when_the_first_process_fails_its_work_every_process_fails(kind: str, first: str) -> None:
    assert _on_two_processes(_main_fails_first, kind) == {0: first, 1: "TrainingError: the others' words"}


def _first_cannot_save(rank: int, folder: str) -> str:
    from types import SimpleNamespace

    from digitgen.training import loop
    from digitgen.training.distributed import DistContext

    loop.state_to_checkpoint = lambda _state, noise_states: {"noise": noise_states}  # what is saved matters not
    state = SimpleNamespace(noise_rng=torch.Generator(), generator=torch.nn.Linear(1, 1))
    loop._save(state, Path(folder) / "gone" / "checkpoint.pt", DistContext(rank, 2))
    return "went on"


def test_a_checkpoint_the_first_process_cannot_write_stops_every_process(tmp_path: Path) -> None:
    assert _on_two_processes(_first_cannot_save, str(tmp_path)) == {
        0: f"OutputError: cannot write {tmp_path / 'gone' / 'checkpoint.pt'}: No such file or directory",
        1: "TrainingError: the first process could not write the checkpoint (its error says why)",
    }


def _one_rank_goes_nan(rank: int) -> str:
    from digitgen.training.distributed import DistContext
    from digitgen.training.loop import check_finite

    check_finite(torch.tensor(float("nan") if rank == 1 else 1.0), "generator", 4, DistContext(rank, 2))
    return "went on"


def test_a_nan_on_one_process_stops_every_process() -> None:
    """Otherwise the other process goes on into DDP's all-reduce and waits there for one that has stopped."""
    tail = (
        "at step 5; stopped before applying it (the last checkpoint this run saved, if any, is intact and can be "
        "exported; to train on, start over with --overwrite and a lower --lr)"
    )
    assert _on_two_processes(_one_rank_goes_nan) == {
        0: f"NonFiniteLossError: generator loss is not finite on another process {tail}",
        1: f"NonFiniteLossError: generator loss is nan {tail}",
    }


def _load_with_a_slow_download(rank: int, port: int, source: str, root: str, calls: dict) -> None:
    """Each process of a two-process run asks for MNIST with --download into one empty folder."""
    import shutil
    import time

    import torch.distributed as dist

    from digitgen.training import data
    from digitgen.training.distributed import DistContext

    def download(into: Path) -> str:  # stands in for torchvision's: slow, and writes the files one by one
        calls[rank] = True
        raw = into / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for part in sorted((Path(source) / "MNIST" / "raw").iterdir()):
            time.sleep(0.2)
            shutil.copy(part, raw / part.name)
        return ""

    data._try_download = download
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loaded = data.load_mnist_once(root, True, DistContext(rank, 2), torch.device("cpu"))
        calls[f"labels {rank}"] = loaded.labels.tolist()
    finally:
        dist.destroy_process_group()


def test_only_the_first_process_downloads_mnist_and_the_others_wait(tmp_path: Path, tiny_mnist: Path) -> None:
    import torch.multiprocessing as mp

    port = free_port()
    calls = mp.Manager().dict()
    mp.spawn(_load_with_a_slow_download, args=(port, str(tiny_mnist), str(tmp_path), calls), nprocs=2, join=True)
    assert 0 in calls and 1 not in calls
    assert calls["labels 0"] == calls["labels 1"] and len(calls["labels 1"]) > 0


def _load_from(rank: int, root: str) -> str:
    from digitgen.training.data import load_mnist_once
    from digitgen.training.distributed import DistContext

    load_mnist_once(root, False, DistContext(rank, 2), torch.device("cpu"))
    return "loaded"


def test_mnist_the_first_process_cannot_load_stops_every_process_with_the_reason(tmp_path: Path) -> None:
    from digitgen.runtime.idx import mnist_not_found_message

    assert _on_two_processes(_load_from, str(tmp_path)) == {
        0: f"DatasetNotFoundError: {mnist_not_found_message(tmp_path)}; point --data-dir (or MNIST_ROOT) at the "
        "folder that holds MNIST/raw/, or pass --download",
        1: "TrainingError: the first process could not load MNIST (its error says why)",
    }


@pytest.mark.parametrize(
    ("world_size", "begins", "ends"),
    [
        ("abc", "WORLD_SIZE='abc' is not a number of processes", "; launch with torchrun, or unset it"),
        ("2", "WORLD_SIZE=2 asks for a process group, but ", "; launch with torchrun, or unset WORLD_SIZE"),  # RANK
    ],
)
def test_a_world_size_torchrun_did_not_set_is_refused_in_one_line(
    tmp_path: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch, world_size: str, begins: str, ends: str
) -> None:
    from click.testing import CliRunner

    from digitgen.cli import main

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    args = ["train", "--data-dir", tiny_mnist, "--out", tmp_path / "run", "--steps", "2", "--batch-size", "16"]
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"Error: {begins}") and result.output.endswith(f"{ends}\n")

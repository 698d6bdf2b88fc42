"""A run directory is never replaced or mixed by accident, and --resume honours or refuses every option."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from digitgen.cli import main
from digitgen.runtime import files
from digitgen.runtime.errors import OutputError
from digitgen.runtime.idx import read_idx
from digitgen.training import loop, run
from digitgen.training.checkpoint import save_checkpoint
from digitgen.training.classifier import Classifier, classifier_weights
from digitgen.training.config import TrainConfig
from digitgen.training.data import MnistTensors, load_mnist
from digitgen.training.errors import RunDirectoryError, TrainingError
from digitgen.training.run import (
    REPLACED_DIR,
    _decay_too_long,
    _setting_text,
    check_precision,
    describe_run_files,
    earlier_run_files,
    remove_run_files,
    set_aside,
    settle_aside,
)
from digitgen.training.run_lock import RunLock, refuse_if_training
from tests.conftest import REPO
from tests.helpers import run_metrics, write_idx, write_tiny_mnist

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

needs_flock = pytest.mark.skipif(fcntl is None, reason="run directories are locked with flock, which Windows lacks")
TINY = ("--batch-size", "16", "--latent-dim", "8", "--device", "cpu", "--checkpoint-every", "100")


def train(tiny_mnist: Path, run_dir: Path, *extra: object) -> tuple[int, str]:
    args = ["train", "--data-dir", str(tiny_mnist), "--out", str(run_dir), *map(str, extra)]
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


@pytest.fixture
def finished_run(tmp_path: Path, tiny_mnist: Path) -> Path:
    run_dir = tmp_path / "run"
    code, output = train(tiny_mnist, run_dir, "--steps", 2, *TINY)
    assert code == 0, output
    return run_dir


def _metrics_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in run_metrics(run_dir)]


def test_training_into_a_run_directory_is_refused(finished_run: Path, tiny_mnist: Path) -> None:
    before = (finished_run / "checkpoint.pt").read_bytes()
    code, output = train(tiny_mnist, finished_run, "--steps", 2, *TINY)
    assert code == 1
    assert output.strip().splitlines() == [
        f"Error: {finished_run} already holds a run (checkpoint.pt, metrics.jsonl, samples (1 grid)); continue it "
        f"with --resume {finished_run / 'checkpoint.pt'} --data-dir {tiny_mnist} --device cpu, or start over with "
        "--overwrite"
    ]  # the options to give again: a resume keeps the run's, not where MNIST is nor the device
    assert (finished_run / "checkpoint.pt").read_bytes() == before


def test_a_folder_of_the_users_named_samples_is_not_a_run(tmp_path: Path, tiny_mnist: Path) -> None:
    (tmp_path / "run" / "samples").mkdir(parents=True)
    (tmp_path / "run" / "samples" / "notes.txt").write_text("mine")
    code, output = train(tiny_mnist, tmp_path / "run", "--steps", 2, *TINY)
    assert code == 0, output
    assert (tmp_path / "run" / "samples" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("name", "make", "refusal"),
    [
        (
            "samples",
            lambda path: path.write_text("mine"),
            "{path} is not a folder, where a run keeps its sample grids; move it",
        ),
        ("checkpoint.pt", Path.mkdir, "{path} is a folder, not a file; move it, or name another file"),
        ("metrics.jsonl", os.mkfifo, "{path} is a pipe, not a file, and no run replaces it; name another file"),
    ],
    ids=["samples-file", "checkpoint-folder", "metrics-pipe"],
)
def test_a_run_file_of_the_wrong_kind_is_refused_before_any_step(
    tmp_path: Path, tiny_mnist: Path, name: str, make: Callable[[Path], object], refusal: str
) -> None:
    """Neither a resume nor --overwrite could use it: named at once, before the data loads, and kept."""
    path = tmp_path / "run" / name
    path.parent.mkdir()
    make(path)
    for extra in ((), ("--overwrite",)):
        code, output = train(tiny_mnist, tmp_path / "run", "--steps", 2, *TINY, *extra)
        assert (code, output.strip().splitlines()) == (1, [f"Error: {refusal.format(path=path)}"])
    assert os.listdir(path.parent) == [name]


def test_a_run_without_a_checkpoint_is_not_offered_a_resume(finished_run: Path, tiny_mnist: Path) -> None:
    """A run that stopped before its first checkpoint (a loss that went non-finite) leaves only its metrics and
    samples: the refusal must not point at a checkpoint that is not there."""
    (finished_run / "checkpoint.pt").unlink()
    code, output = train(tiny_mnist, finished_run, "--steps", 2, *TINY)
    assert (code, output.strip()) == (
        1,
        f"Error: {finished_run} holds a run that saved no checkpoint (metrics.jsonl, samples (1 grid)); "
        "start over with --overwrite",
    )


def test_overwrite_starts_over_and_says_what_it_deleted(finished_run: Path, tiny_mnist: Path) -> None:
    """It deletes the earlier run's files only: a file of the user's in the folder, or in its samples, stays."""
    (finished_run / "samples" / "step0000099.png").write_bytes(b"an older grid")
    (finished_run / "samples" / "notes.txt").write_text("mine")
    (finished_run / "samples" / ("step" + "\u0661" * 7 + ".png")).write_text("mine")  # other scripts' digits
    (finished_run / "mine.png").write_bytes(b"mine")
    code, output = train(tiny_mnist, finished_run, "--steps", 3, "--overwrite", *TINY)
    assert code == 0, output
    lines = output.splitlines()  # what it set aside first, then what the run will do
    assert lines[0] == (
        f"--overwrite: set aside the earlier run's checkpoint.pt, metrics.jsonl, samples (2 grids) in {finished_run}, "
        "deleted once this run saves a checkpoint (put back if it stops before)"
    )
    assert not (finished_run / REPLACED_DIR).exists()  # saved: the earlier run is gone
    assert lines[1].startswith("training on cpu"), output
    assert not (finished_run / "samples" / "step0000099.png").exists()
    assert (finished_run / "samples" / "notes.txt").read_text() == "mine"
    assert (finished_run / "samples" / ("step" + "\u0661" * 7 + ".png")).read_text() == "mine"
    assert (finished_run / "mine.png").read_bytes() == b"mine"
    steps = _metrics_steps(finished_run)
    assert steps == sorted(set(steps)) and torch.load(finished_run / "checkpoint.pt", weights_only=True)["step"] == 3


def _files(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _disk_full(payload: object, path: Path) -> None:
    """``save_checkpoint`` on a full disk."""
    raise OutputError(f"cannot write {path}: No space left on device")


def test_an_overwrite_that_fails_before_its_first_checkpoint_puts_the_earlier_run_back(
    finished_run: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the new run's first checkpoint had left neither run: the earlier one deleted at the start."""
    (finished_run / "mine.txt").write_text("mine")
    before = _files(finished_run)

    monkeypatch.setattr(loop, "save_checkpoint", _disk_full)
    code, output = train(tiny_mnist, finished_run, "--steps", 3, "--seed", 7, "--overwrite", *TINY)
    assert code == 1 and output.splitlines()[-1] == (
        f"Error: cannot write {finished_run / 'checkpoint.pt'}: No space left on device"
    )
    assert _files(finished_run) == before and not (finished_run / REPLACED_DIR).exists()


def test_a_run_set_aside_by_a_killed_overwrite_is_named_not_lost(finished_run: Path, tiny_mnist: Path) -> None:
    aside = finished_run / REPLACED_DIR
    earlier = _files(finished_run)
    set_aside(earlier_run_files(finished_run), finished_run)  # the --overwrite was killed here, ...
    code, output = train(tiny_mnist, finished_run, "--steps", 2, *TINY)
    assert (code, output.strip()) == (
        1,
        f"Error: {finished_run} holds a run set aside by a stopped --overwrite; the run it replaced is in {aside}: "
        "move its files back to keep it",
    )
    (finished_run / "metrics.jsonl").write_text('{"step": 1}\n')  # ... or here, its first step logged
    code, output = train(tiny_mnist, finished_run, "--steps", 2, *TINY)
    assert (code, output.strip()) == (
        1,
        f"Error: {finished_run} holds a run that saved no checkpoint (metrics.jsonl); start over with --overwrite; "
        f"the run it replaced is in {aside}: move its files back to keep it",
    )
    assert {aside / path.relative_to(finished_run): data for path, data in earlier.items()} == _files(aside)


def test_the_earlier_run_goes_at_the_first_checkpoint_not_at_the_end(
    finished_run: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept to the end, it would take its room for the whole run, and be left behind by a run killed meanwhile."""
    aside_at_save: list[bool] = []
    save = loop.save_checkpoint

    def noted(payload: object, path: Path) -> None:
        aside_at_save.append((finished_run / REPLACED_DIR).is_dir())
        save(payload, path)

    monkeypatch.setattr(loop, "save_checkpoint", noted)
    every_step = [option if option != "100" else "1" for option in TINY]  # --checkpoint-every 1
    code, output = train(tiny_mnist, finished_run, "--steps", 3, "--overwrite", *every_step)
    assert code == 0, output
    assert aside_at_save == [True, False, False]


def test_a_second_overwrite_after_a_killed_one_keeps_the_run_set_aside(
    finished_run: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The killed run saved no checkpoint: the run it set aside is still the earlier run, and must survive a retry
    that fails too (it had been deleted at the retry's start)."""
    earlier = _files(finished_run)
    aside = finished_run / REPLACED_DIR
    set_aside(earlier_run_files(finished_run), finished_run)  # an --overwrite killed ...
    (finished_run / "metrics.jsonl").write_text('{"step": 1}\n')  # ... after its first step
    code, output = train(tiny_mnist, finished_run, "--resume", aside / "checkpoint.pt", "--overwrite", *TINY)
    assert (code, output.strip()) == (
        1,
        f"Error: {aside / 'checkpoint.pt'} is in the run an --overwrite set aside; move its files back into "
        f"{finished_run} first",
    )

    monkeypatch.setattr(loop, "save_checkpoint", _disk_full)
    code, output = train(tiny_mnist, finished_run, "--steps", 3, "--overwrite", *TINY)
    assert code == 1 and output.splitlines()[0] == (
        f"--overwrite: deleted the stopped run's metrics.jsonl in {finished_run}; the run it replaced stays set aside "
        f"in {aside}, deleted once this run saves a checkpoint (put back if it stops before)"
    )
    assert _files(finished_run) == earlier and not aside.exists()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (("--steps", "3", "--lr-decay-epochs", "1000"), "is longer than the run"),
        (("--resume", "{other}", "--seed", "5"), "differs from the resumed run's 0"),
    ],
)
def test_overwrite_deletes_nothing_when_another_option_is_refused(
    finished_run: Path, tiny_mnist: Path, tmp_path: Path, options: tuple[str, ...], words: str
) -> None:
    other = tmp_path / "other"
    assert train(tiny_mnist, other, "--steps", 2, *TINY)[0] == 0
    files = {path: path.read_bytes() for path in finished_run.rglob("*") if path.is_file()}
    given = [option.format(other=other / "checkpoint.pt") for option in options]
    code, output = train(tiny_mnist, finished_run, "--overwrite", *TINY, *given)
    assert code == 1 and words in output, output
    assert {path: path.read_bytes() for path in finished_run.rglob("*") if path.is_file()} == files


def test_overwrite_deletes_nothing_when_a_folder_has_a_sample_grids_name(finished_run: Path, tiny_mnist: Path) -> None:
    """It could not be deleted, nor replaced by the new run's grid: refused before any file is gone."""
    (finished_run / "samples" / "step0000099.png").mkdir()
    files = {path: path.read_bytes() for path in finished_run.rglob("*") if path.is_file()}
    code, output = train(tiny_mnist, finished_run, "--steps", 2, "--overwrite", *TINY)
    problem = f"{finished_run / 'samples' / 'step0000099.png'} is a folder, not a file; move it, or name another file"
    assert code == 1 and output == f"Error: {problem}\n", output
    assert {path: path.read_bytes() for path in finished_run.rglob("*") if path.is_file()} == files


def test_resume_continues_the_run_in_place(finished_run: Path, tiny_mnist: Path) -> None:
    code, output = train(tiny_mnist, finished_run, "--resume", finished_run / "checkpoint.pt", "--steps", 4)
    assert code == 0, output
    assert torch.load(finished_run / "checkpoint.pt", weights_only=True)["step"] == 4


def test_resuming_a_complete_run_says_so_and_how_to_train_it_further(finished_run: Path, tiny_mnist: Path) -> None:
    """Not "0 to do" and "done: step 2 in 0s (0 images/s)": the run was complete, and --steps extends it."""
    code, output = train(tiny_mnist, finished_run, "--resume", finished_run / "checkpoint.pt")
    assert code == 0, output
    assert output.strip().splitlines()[-1] == (
        f"the run was complete already, at step 2: nothing to train (checkpoint {finished_run / 'checkpoint.pt'}); "
        "to train it further, resume it with --steps or --epochs past step 2"
    )
    assert "images/s" not in output and "to do" not in output
    assert torch.load(finished_run / "checkpoint.pt", weights_only=True)["step"] == 2
    # a setting the resume changes is kept for the run's later extension, trained or not
    assert train(tiny_mnist, finished_run, "--resume", finished_run / "checkpoint.pt", "--checkpoint-every", 7)[0] == 0
    assert torch.load(finished_run / "checkpoint.pt", weights_only=True)["train"]["checkpoint_every"] == 7
    elsewhere = finished_run.parent / "copy"  # resumed into a new folder: its first checkpoint is the run's state
    assert train(tiny_mnist, elsewhere, "--resume", finished_run / "checkpoint.pt")[0] == 0
    assert torch.load(elsewhere / "checkpoint.pt", weights_only=True)["step"] == 2


def test_resume_removes_the_grids_of_steps_after_its_checkpoint(finished_run: Path, tiny_mnist: Path) -> None:
    """Left by a hard stop after the last checkpoint (as metrics lines are): a resumed run that ends sooner would
    show them as its own. A file of the user's in the samples folder stays."""
    samples = finished_run / "samples"
    (samples / "step0000050.png").write_bytes(b"a grid of a step the checkpoint never reached")
    (samples / "notes.txt").write_text("mine")
    code, output = train(tiny_mnist, finished_run, "--resume", finished_run / "checkpoint.pt", "--steps", 4)
    assert code == 0, output
    assert not (samples / "step0000050.png").exists() and (samples / "notes.txt").read_text() == "mine"
    assert (samples / "step0000002.png").is_file() and (samples / "step0000004.png").is_file()


def test_resuming_from_a_file_that_is_no_checkpoint_says_so_first(finished_run: Path, tiny_mnist: Path) -> None:
    """Not "the folder already holds a run": what is wrong is the file given to --resume."""
    model = finished_run / "generator.onnx"
    model.write_bytes(b"an ONNX file, say")
    code, output = train(tiny_mnist, finished_run, "--resume", model, "--steps", 4)
    assert code == 1 and "already holds a run" not in output and str(model) in output, output
    assert len(output.strip().splitlines()) == 1


def test_a_resume_shorter_than_the_runs_decay_is_refused_unless_given_one_that_fits(
    finished_run: Path, tiny_mnist: Path, tmp_path: Path
) -> None:
    """The decay is part of the recipe: a shorter resumed run does not cut it (the learning rate would jump)."""
    payload = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    payload["train"].update(total_steps=40, lr_decay_steps=32)  # at step 2 of 40, decaying over the last 32
    torch.save(payload, tmp_path / "mid-run.pt")
    resume = ("--resume", tmp_path / "mid-run.pt")
    code, output = train(tiny_mnist, tmp_path / "cut", *resume, "--steps", 10)
    assert (code, output.strip()) == (
        1,
        "Error: the resumed run's learning-rate decay (32 steps) is longer than the 10 steps asked for; give more "
        "steps, or a shorter decay with --lr-decay-epochs",
    )
    code, output = train(tiny_mnist, tmp_path / "shorter", *resume, "--steps", 10, "--lr-decay-epochs", 0.5)
    assert code == 0 and "falling to 0 over the last 8 steps" in output, output
    assert torch.load(tmp_path / "shorter" / "checkpoint.pt", weights_only=True)["train"]["lr_decay_steps"] == 8


def test_resume_and_overwrite_of_the_same_run_is_refused(finished_run: Path, tiny_mnist: Path) -> None:
    code, output = train(tiny_mnist, finished_run, "--resume", finished_run / "checkpoint.pt", "--overwrite")
    assert code == 1 and "give one" in output


def test_resuming_another_run_into_a_run_directory_is_refused(
    finished_run: Path, tiny_mnist: Path, tmp_path: Path
) -> None:
    code, output = train(tiny_mnist, tmp_path / "other", "--steps", 2, *TINY)
    assert code == 0, output
    code, output = train(tiny_mnist, finished_run, "--resume", tmp_path / "other" / "checkpoint.pt", "--steps", 4)
    assert code == 1 and "already holds a run" in output


@pytest.mark.parametrize(
    ("option", "value", "kept"),
    [
        ("--batch-size", "32", "16"),
        ("--lr", "0.001", "0.0002"),
        ("--lr-d", "0.0004", "0.0002"),  # a run without --lr-d trained its discriminator at --lr
        ("--seed", "5", "0"),
        ("--latent-dim", "16", "8"),
        ("--conditional-norm", None, "off"),
        ("--g-width", "32", "64"),
        ("--d-width", "32", "64"),
        ("--adc-weight", "0.5", "0.0"),
        ("--label-weight", "0.5", "0.0"),
        ("--label-weight-falls", None, "off"),
        ("--label-weight-floor", "0.05", "0.0"),
        ("--label-digit-weights", "7=2", "none"),
        ("--diffaugment", "translation", "none"),
        ("--precision", "bf16", "fp32"),
        ("--subset", "100", "none"),  # the run trained on every image: no subset
    ],
)
def test_resume_refuses_options_that_would_change_the_run(
    finished_run: Path, tiny_mnist: Path, option: str, value: str | None, kept: str
) -> None:
    before = (finished_run / "checkpoint.pt").read_bytes()
    given = (option,) if value is None else (option, value)
    code, output = train(tiny_mnist, finished_run, "--resume", finished_run / "checkpoint.pt", "--steps", 4, *given)
    assert code == 1
    assert output.strip() == (
        f"Error: {' '.join(given)} differs from the resumed run's {kept}; a resumed run keeps its settings "
        "(only --steps, --epochs, --lr-decay-epochs and --checkpoint-every can change)"
    )
    assert (finished_run / "checkpoint.pt").read_bytes() == before


def test_a_resumed_bf16_run_stays_bf16(tmp_path: Path, tiny_mnist: Path) -> None:
    run_dir = tmp_path / "run"
    code, output = train(tiny_mnist, run_dir, "--steps", 2, "--precision", "bf16", *TINY)
    assert code == 0 and ", bf16 autocast" in output, output
    code, output = train(tiny_mnist, run_dir, "--resume", run_dir / "checkpoint.pt", "--steps", 3)
    assert code == 0 and ", bf16 autocast" in output, output
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["train"]["precision"] == "bf16"


def test_resume_accepts_options_equal_to_the_run_and_sets_the_checkpoint_interval(
    finished_run: Path, tiny_mnist: Path
) -> None:
    code, output = train(
        tiny_mnist,
        finished_run,
        "--resume",
        finished_run / "checkpoint.pt",
        "--steps",
        4,
        *TINY[:4],
        "--lr-d",
        "0.0002",  # the rate the run's discriminator had: its --lr
        "--checkpoint-every",
        1,
    )
    assert code == 0, output
    assert torch.load(finished_run / "checkpoint.pt", weights_only=True)["train"]["checkpoint_every"] == 1


def test_resume_without_out_continues_the_run_where_its_checkpoint_is(
    finished_run: Path, tiny_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in the default runs/latest, which would leave the saved run behind at its old step."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    checkpoint = finished_run / "checkpoint.pt"
    args = ["train", "--data-dir", str(tiny_mnist), "--resume", str(checkpoint), "--steps", "4", *TINY]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    assert list(elsewhere.iterdir()) == []


def test_resuming_with_another_number_of_processes_says_it_is_not_exact(
    finished_run: Path, tiny_mnist: Path, tmp_path: Path
) -> None:
    payload = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    payload["rng"]["noise"] = payload["rng"]["noise"] * 2  # as two processes save it
    edited = tmp_path / "two.pt"
    torch.save(payload, edited)
    code, output = train(tiny_mnist, tmp_path / "resumed", "--resume", edited, "--steps", 4)
    assert code == 0, output
    assert "note: the checkpoint was saved by 2 process(es) and resumes with 1; the run goes on, but not" in output
    code, output = train(tiny_mnist, finished_run, "--resume", finished_run / "checkpoint.pt", "--steps", 4)
    assert code == 0 and "note:" not in output, output


def test_resuming_with_other_threads_or_another_torch_says_it_is_not_bit_for_bit(
    finished_run: Path, tiny_mnist: Path, tmp_path: Path
) -> None:
    """A matrix product's sums are split among torch's threads: a resume on another number of them (another
    OMP_NUM_THREADS, CPU set or torch) parts from the run never stopped, which had gone unsaid."""
    payload = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert payload["numerics"] == {"torch": torch.__version__, "threads": torch.get_num_threads()}
    payload["numerics"]["threads"] += 1
    edited = tmp_path / "other.pt"
    torch.save(payload, edited)
    code, output = train(tiny_mnist, tmp_path / "resumed", "--resume", edited, "--steps", 4)
    assert code == 0, output
    assert (
        f"note: the checkpoint was saved with torch {torch.__version__} on {torch.get_num_threads() + 1} thread(s) "
        f"and resumes with torch {torch.__version__} on {torch.get_num_threads()}; the run goes on, but not bit"
    ) in output
    del payload["numerics"]  # a checkpoint from before they were recorded: nothing to compare, nothing said
    torch.save(payload, edited)
    code, output = train(tiny_mnist, tmp_path / "older", "--resume", edited, "--steps", 4)
    assert code == 0 and "note:" not in output, output


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("checkpoint_every", 0, "checkpoint and log intervals must be positive"),
        ("log_every", 0, "checkpoint and log intervals must be positive"),
        ("betas", (2.0, 0.999), "Adam's betas must be two numbers in [0, 1)"),
        ("ema_decay", 1.5, "the EMA decay must be in [0, 1]"),
        ("seed", 2**40, "the seed must be 0 to 4294967295"),
        ("seed", 1.5, "seed must be a whole number, not 1.5"),
        ("subset", 100.5, "subset must be a whole number, not 100.5"),
        ("batch_size", 16.0, "batch_size must be a whole number, not 16.0"),
        ("batch_size", True, "batch_size must be a whole number, not True"),
        ("total_steps", 20.5, "total_steps must be a whole number, not 20.5"),
        ("lr", float("inf"), "lr must be a finite number, not inf"),
        pytest.param("lr", 10**400, f"lr must be a finite number, not {10**400}", id="lr-int-past-float"),  # pickled
        pytest.param("lr", 1e308, "learning rate must be positive and at most 3.403e+38", id="lr-past-float32"),
        pytest.param(
            "total_steps", 2**53 + 1, "the number of steps must be from 1 to 9,007,199,254,740,992", id="steps"
        ),
        pytest.param("betas", (10**400, 0.999), "betas must be two finite numbers", id="betas-int-past-float"),
        ("label_weight_falls", 1, "label_weight_falls must be true or false, not 1"),
        pytest.param(  # quoted as every refusal quotes a value: a short line, then its length
            "label_weight_falls", "y" * 100_000, "must be true or false, not 'yyyy", id="long-text"
        ),
        ("precision", None, "precision must be text, not None"),
    ],
)
def test_a_checkpoint_with_impossible_settings_is_refused_in_one_line(
    finished_run: Path, tiny_mnist: Path, tmp_path: Path, setting: str, value: object, problem: str
) -> None:
    payload = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    payload["train"][setting] = value
    edited = tmp_path / "edited.pt"
    torch.save(payload, edited)
    code, output = train(tiny_mnist, tmp_path / "resumed", "--resume", edited, "--steps", 4)
    assert code == 1 and len(output.strip().splitlines()) == 1, output
    assert output.startswith("Error: ") and problem in output, output
    assert len(output) < 2000, output[:200]


def test_a_subset_is_the_first_images_with_their_own_labels(tiny_mnist: Path, tmp_path: Path) -> None:
    code, output = train(tiny_mnist, tmp_path / "run", "--steps", 1, "--subset", 100, *TINY)
    assert code == 0, output
    data = load_mnist(tiny_mnist)
    first = MnistTensors(data.images[:100], data.labels[:100])
    recorded = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["train"]
    assert (recorded["subset"], recorded["train_images"], recorded["train_data_sha256"]) == (100, 100, first.sha256())


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (("--steps", 4, "--epochs", 1), "give --steps or --epochs, not both"),
        (("--steps", 4, "--subset", 1000), "--subset 1000 is more than the 256 training images in "),
        (
            ("--epochs", 1, "--lr-decay-epochs", 0.01),
            "--lr-decay-epochs 0.01 is less than one step (16 steps an epoch); give at least 0.062, or 0 for no decay",
        ),
        (  # its steps overflowed a float in the decay and the progress lines: a traceback
            ("--epochs", 10**20),
            f"--epochs {10**20} is {16 * 10**20:,} steps (16 an epoch), more than the 9,007,199,254,740,992 a run may",
        ),
    ],
)
def test_options_that_would_do_nothing_are_refused_not_ignored(
    tiny_mnist: Path, tmp_path: Path, options: tuple, problem: str
) -> None:
    code, output = train(tiny_mnist, tmp_path / "run", *options, *TINY)
    assert code == 1 and output.startswith(f"Error: {problem}") and len(output.splitlines()) == 1, output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (("--steps", 2**53 + 1), "Invalid value for '--steps': 9007199254740993 is not in the range 1<=x<=900719925"),
        (("--steps", 2, "--lr", "1e39"), "Invalid value for '--lr': 1e+39 is not in the range 0<x<=3.40282346638528"),
        (("--steps", 2, "--lr-d", "1e39"), "Invalid value for '--lr-d': 1e+39 is not in the range 0<x<=3.4028234663"),
    ],
)
def test_numbers_past_what_training_can_hold_are_refused_as_they_are_read(
    tiny_mnist: Path, tmp_path: Path, options: tuple, problem: str
) -> None:
    """A learning rate past float32's largest failed inside Adam at the first step, with a traceback."""
    code, output = train(tiny_mnist, tmp_path / "run", *options, *TINY)
    assert code == 2 and output.startswith(f"Error: {problem}") and len(output.splitlines()) == 1, output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where torch sees no CUDA")
def test_device_cuda_without_cuda_is_refused_before_anything_is_written(tiny_mnist: Path, tmp_path: Path) -> None:
    code, output = train(tiny_mnist, tmp_path / "run", "--device", "cuda", "--steps", 2)
    problem = "--device cuda: CUDA is not available on this machine; use --device cpu"
    assert code == 1 and output == f"Error: {problem}\n", output
    assert not (tmp_path / "run").exists()


def test_train_classifier_on_fewer_images_than_a_batch_is_one_line(tmp_path: Path) -> None:
    root = write_tiny_mnist(tmp_path / "small", train_count=100)
    result = CliRunner().invoke(main, ["train-classifier", "--data-dir", str(root), "--out", str(tmp_path / "c.onnx")])
    assert result.exit_code == 1, result.output
    problem = "a batch of 128 images is more than the 100 training images; the classifier needs a larger training split"
    assert result.output.splitlines()[-1] == f"Error: {problem}", result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["train", "train-classifier"])
def test_a_training_seed_past_32_bits_is_refused(command: str, tiny_mnist: Path, tmp_path: Path) -> None:
    """torch seeds with 64 bits and an epoch's order with seed * 100,003 + epoch: larger seeds overflow."""
    args = [command, "--data-dir", str(tiny_mnist), "--out", str(tmp_path / "x"), "--seed", str(2**32)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "4294967296 is not in the range 0<=x<=4294967295" in result.output, result.output


def test_model_widths_and_adc_weight_are_kept_in_the_checkpoint(tmp_path: Path, tiny_mnist: Path) -> None:
    run_dir = tmp_path / "run"
    code, output = train(
        tiny_mnist, run_dir, "--steps", 2, *TINY, "--g-width", 12, "--d-width", 24, "--adc-weight", 0.25
    )
    assert code == 0, output
    assert "ADC classifier weight 0.25" in output
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["config"]["d_width"] == 24 and saved["train"]["adc_weight"] == 0.25
    assert saved["config"]["g_width"] == 12
    assert saved["generator"]["project.0.weight"].shape[0] == 12 * 7 * 7
    assert saved["discriminator"]["features.0.parametrizations.weight.original"].shape[0] == 24
    assert saved["discriminator"]["classifier.parametrizations.weight.original"].shape == (20, 4 * 24 * 16)
    code, output = train(tiny_mnist, run_dir, "--resume", run_dir / "checkpoint.pt", "--steps", 3)
    assert code == 0, output
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 3


@pytest.fixture
def label_weights(tmp_path: Path) -> Path:
    """Classifier weights that are not the evaluator's (an untrained classifier)."""
    path = tmp_path / "label_weights.pt"
    torch.manual_seed(1)
    save_checkpoint(classifier_weights(Classifier(), 0.1), path)
    return path


def test_the_label_classifier_is_saved_in_the_checkpoint_and_kept_on_resume(
    tmp_path: Path, tiny_mnist: Path, label_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    code, output = train(
        tiny_mnist, run_dir, "--steps", 2, *TINY, "--label-classifier", label_weights, "--label-weight", 0.5
    )
    assert code == 0, output
    assert "label classifier weight 0.5" in output
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    given = torch.load(label_weights, weights_only=True)["classifier"]
    assert saved["train"]["label_weight"] == 0.5
    [kept] = saved["label_classifiers"]
    assert kept.keys() == given.keys() and all(torch.equal(kept[k], given[k]) for k in given)
    again = ("--label-classifier", label_weights, "--label-weight", 0.5)  # the same command, resumed
    code, output = train(tiny_mnist, run_dir, "--resume", run_dir / "checkpoint.pt", "--steps", 3, *again)
    assert code == 0, output
    label_weights.unlink()  # the run needs only its checkpoint
    code, output = train(tiny_mnist, run_dir, "--resume", run_dir / "checkpoint.pt", "--steps", 4)
    assert code == 0, output
    resumed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 4 and all(torch.equal(resumed["label_classifiers"][0][k], given[k]) for k in given)
    other = tmp_path / "other_weights.pt"
    torch.manual_seed(2)
    save_checkpoint(classifier_weights(Classifier(), 0.1), other)
    code, output = train(tiny_mnist, run_dir, "--resume", run_dir / "checkpoint.pt", "--label-classifier", other)
    assert code == 1
    assert output.strip() == (
        f"Error: --label-classifier {other} differs from the resumed run's label classifier "
        "(the one in its checkpoint); a resumed run keeps its settings: leave it out"
    )


def test_several_label_classifiers_are_said_saved_in_order_and_kept_on_resume(
    tmp_path: Path, tiny_mnist: Path, label_weights: Path
) -> None:
    second = tmp_path / "second_weights.pt"
    torch.manual_seed(2)
    save_checkpoint(classifier_weights(Classifier(), 0.1), second)
    run_dir = tmp_path / "run"
    both = ("--label-classifier", label_weights, "--label-classifier", second)
    code, output = train(tiny_mnist, run_dir, "--steps", 2, *TINY, *both, "--label-weight", 0.5)
    assert code == 0, output
    assert "label classifier weight 0.5 (mean of 2 classifiers)" in output
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["label_classifiers"]
    given = [torch.load(path, weights_only=True)["classifier"] for path in (label_weights, second)]
    assert len(saved) == 2 and all(torch.equal(s[k], g[k]) for s, g in zip(saved, given, strict=True) for k in g)
    before = (run_dir / "checkpoint.pt").read_bytes()
    swapped = ("--label-classifier", second, "--label-classifier", label_weights)
    code, output = train(tiny_mnist, run_dir, "--resume", run_dir / "checkpoint.pt", "--steps", 3, *swapped)
    assert (code, output.strip()) == (
        1,
        f"Error: --label-classifier {second} --label-classifier {label_weights} differs from the resumed run's "
        "label classifier (the 2 in its checkpoint); a resumed run keeps its settings: leave it out",
    )
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    code, output = train(tiny_mnist, run_dir, "--resume", run_dir / "checkpoint.pt", "--steps", 3, *both)
    assert code == 0, output
    assert "(mean of 2 classifiers)" in output


def test_the_same_label_classifier_twice_is_refused(tmp_path: Path, tiny_mnist: Path, label_weights: Path) -> None:
    copy = tmp_path / "copy.pt"
    copy.write_bytes(label_weights.read_bytes())
    both = ("--label-classifier", label_weights, "--label-classifier", copy, "--label-weight", 0.5)
    code, output = train(tiny_mnist, tmp_path / "run", "--steps", 2, *TINY, *both)
    assert (code, output.strip()) == (
        1,
        f"Error: {copy} holds the same weights as an earlier --label-classifier: give each once",
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_falling_label_weight_its_floor_and_per_digit_weights_are_said_saved_and_kept_on_resume(
    tmp_path: Path, tiny_mnist: Path, label_weights: Path
) -> None:
    run_dir = tmp_path / "run"
    label = ("--label-classifier", label_weights, "--label-weight", 0.5, "--label-weight-falls")
    floor_and_per_digit = ("--label-weight-floor", 0.1, "--label-digit-weights", "7=2, 4=3")
    code, output = train(
        tiny_mnist, run_dir, "--epochs", 1, "--lr-decay-epochs", 1, *TINY, *label, *floor_and_per_digit
    )
    assert code == 0, output
    assert "label classifier weight 0.5 falling with the learning rate to 0.1 (per digit x 4=3,7=2)" in output
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)["train"]
    assert (saved["label_weight_falls"], saved["label_weight_floor"], saved["label_digit_weights"]) == (
        True,
        0.1,
        "4=3,7=2",
    )
    before = (run_dir / "checkpoint.pt").read_bytes()
    code, output = train(tiny_mnist, run_dir, "--resume", run_dir / "checkpoint.pt", "--lr-decay-epochs", 0)
    assert (code, output.strip()) == (
        1,
        "Error: --label-weight-falls needs a learning-rate decay of at least one step: give --lr-decay-epochs",
    )
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    resume = ("--resume", run_dir / "checkpoint.pt", "--epochs", 2, *floor_and_per_digit)
    code, output = train(tiny_mnist, run_dir, *resume)
    assert code == 0, output
    assert "falling with the learning rate to 0.1 (per digit x 4=3,7=2)" in output


def test_bad_per_digit_label_weights_are_refused_in_one_line(tmp_path: Path, tiny_mnist: Path) -> None:
    code, output = train(tiny_mnist, tmp_path / "run", "--steps", 1, *TINY, "--label-digit-weights", "7=2,11=1")
    assert code == 2
    assert output.strip() == (
        "Error: Invalid value for '--label-digit-weights': '11=1' is not DIGIT=MULTIPLIER with a digit from 0 to 9 "
        "(see --help)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", ["--label-digit-weights", "--diffaugment"])
def test_an_empty_list_option_is_refused_not_read_as_none(tmp_path: Path, tiny_mnist: Path, option: str) -> None:
    code, output = train(tiny_mnist, tmp_path / "run", "--steps", 1, *TINY, option, " ")
    assert code == 2
    assert output.strip() == (
        f"Error: Invalid value for '{option}': empty: give a value, or leave the option out (see --help)"
    )
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_the_falling_label_weight_resumes_with_a_constant_one(
    finished_run: Path, tiny_mnist: Path
) -> None:
    checkpoint = finished_run / "checkpoint.pt"
    payload = torch.load(checkpoint, weights_only=True)
    del payload["train"]["label_weight_falls"]
    torch.save(payload, checkpoint)
    code, output = train(tiny_mnist, finished_run, "--resume", checkpoint, "--steps", 3)
    assert code == 0, output
    assert torch.load(checkpoint, weights_only=True)["train"]["label_weight_falls"] is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--label-weight", "0.5"), "--label-weight needs --label-classifier (weights written by train-classifier)"),
        (
            ("--label-classifier", "{weights}"),
            "--label-classifier needs a positive --label-weight, e.g. --label-weight 0.5",
        ),
        (
            ("--label-classifier", "{weights}", "--label-weight", "0"),
            "--label-classifier needs a positive --label-weight, e.g. --label-weight 0.5",
        ),
        (
            ("--label-classifier", "{evaluator}", "--label-weight", "0.5"),
            "{evaluator} holds the evaluator's classifier (classifier_weights.pt); training against it would game "
            "`evaluate`: train another, e.g. `digitgen train-classifier --seed 1 --out label.onnx`",
        ),
        (
            ("--label-classifier", "{checkpoint}", "--label-weight", "0.5"),
            "{checkpoint}: not digitgen classifier weights (see `digitgen train-classifier`)",
        ),
        (("--label-classifier", "{missing}", "--label-weight", "0.5"), "classifier weights not found: {missing}"),
        (
            ("--label-weight-falls", "--lr-decay-epochs", "1"),
            "--label-weight-falls needs a positive --label-weight and its --label-classifier",
        ),
        (
            ("--label-classifier", "{weights}", "--label-weight", "0.5", "--label-weight-falls"),
            "--label-weight-falls needs a learning-rate decay of at least one step: give --lr-decay-epochs",
        ),
        (
            (
                "--label-classifier",
                "{weights}",
                "--label-weight",
                "0.5",
                "--label-weight-falls",
                "--lr-decay-epochs",
                "1e-6",
            ),
            "--lr-decay-epochs 1e-06 is less than one step (16 steps an epoch); give at least 0.062, or 0 for no decay",
        ),
        (
            ("--lr-decay-epochs", "1e308"),
            "the learning-rate decay (--lr-decay-epochs 1e+308: more steps than any run) is longer than the run "
            "(2 steps); for a run this short give --lr-decay-epochs 0.125 or less (the whole run is 0.125 epochs)",
        ),
        (
            ("--label-digit-weights", "7=2"),
            "--label-digit-weights needs a positive --label-weight and its --label-classifier",
        ),
        (
            ("--label-classifier", "{weights}", "--label-weight", "0.5", "--label-weight-floor", "0.1"),
            "--label-weight-floor needs --label-weight-falls",
        ),
        (  # 0 given is given: refused as any other floor would be, not taken silently
            ("--label-weight-floor", "0"),
            "--label-weight-floor needs --label-weight-falls",
        ),
        (
            (
                "--label-classifier",
                "{weights}",
                "--label-weight",
                "0.5",
                "--label-weight-falls",
                "--label-weight-floor",
                "0.5",
            ),
            "--label-weight-floor 0.5 must be below --label-weight 0.5",
        ),
        (
            ("--resume", "{checkpoint}", "--label-classifier", "{weights}"),
            "--label-classifier {weights} differs from the resumed run's label classifier (none); a resumed run keeps "
            "its settings: leave it out",
        ),
    ],
)
def test_label_classifier_options_are_refused_before_any_run_is_touched(
    finished_run: Path, tiny_mnist: Path, label_weights: Path, options: tuple[str, ...], message: str
) -> None:
    checkpoint = finished_run / "checkpoint.pt"
    paths = {
        "weights": label_weights,
        "evaluator": REPO / "artifacts" / "classifier_weights.pt",
        "checkpoint": checkpoint,
        "missing": finished_run / "none.pt",
    }
    before = checkpoint.read_bytes()
    overwrite = () if "--resume" in options else ("--overwrite",)
    given = [option.format(**paths) for option in options]
    code, output = train(tiny_mnist, finished_run, "--steps", 2, *TINY, *overwrite, *given)
    assert code == 1
    assert output.strip() == "Error: " + message.format(**paths)
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize(
    ("where", "options", "words"),
    [
        ("afile", ("--steps", "2"), "--out {out} is a file, not a directory"),
        ("afile/run", ("--steps", "2"), "--out {out} lies under {tmp}/afile, which is a file"),
        (
            "dangling",
            ("--steps", "2"),
            "--out {out} is a link to {tmp}/nowhere, which does not exist: create it, or name another folder",
        ),
        (
            "loop",
            ("--steps", "2"),
            "--out {out} is a link in a loop of links ({out} -> {tmp}/loop2 -> ...): name another folder",
        ),
        ("run", ("--resume", "{tmp}/typo.pt"), "checkpoint not found: {tmp}/typo.pt"),
        (
            "run",
            ("--resume", "/dev/zero"),
            "/dev/zero: not a readable digitgen checkpoint (not a regular file: a folder, a pipe or a device)",
        ),
        (
            "run",
            ("--resume", "{out}/checkpoint.pt", "--steps", "1"),
            "the resumed run is at step 2, past the 1 steps asked for; give --steps or --epochs beyond it",
        ),
        (
            "new",
            ("--steps", "2", "--subset", "10"),
            "a batch of 16 images is more than the 10 training images; lower --batch-size or raise --subset",
        ),
    ],
)
def test_what_training_cannot_do_is_one_line_and_touches_nothing(
    finished_run: Path, tiny_mnist: Path, tmp_path: Path, where: str, options: tuple[str, ...], words: str
) -> None:
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    out = tmp_path / where
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    given = [option.format(out=out, tmp=tmp_path) for option in options]
    code, output = train(tiny_mnist, out, *given, *TINY)
    assert (code, output.strip().splitlines()) == (1, ["Error: " + words.format(out=out, tmp=tmp_path)])
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == files


def test_a_batch_larger_than_all_the_training_images_asks_only_for_a_smaller_batch(
    tmp_path: Path, tiny_mnist: Path
) -> None:
    """Without --subset every image is in use: raising it is no way out."""
    options = [option for option in TINY if option not in ("--batch-size", "16")]
    code, output = train(tiny_mnist, tmp_path / "run", "--steps", 2, "--batch-size", 512, *options)
    assert (code, output.strip()) == (
        1,
        "Error: a batch of 512 images is more than the 256 training images; lower --batch-size",
    )


def test_training_runs_when_the_cli_is_called_off_the_main_thread(tmp_path: Path, tiny_mnist: Path) -> None:
    """An app may call the CLI from a worker thread, where Python allows no signal handlers."""
    results: list[tuple[int, str]] = []
    worker = threading.Thread(target=lambda: results.append(train(tiny_mnist, tmp_path / "run", "--steps", 2, *TINY)))
    worker.start()
    worker.join(timeout=120)
    ((code, output),) = results
    assert code == 0, output
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_a_label_outside_the_models_classes_is_refused_in_one_line(tmp_path: Path) -> None:
    """An IDX label is any byte: label 12 late in the split would stop training with an index error at the batch
    that drew it, or not at all in a short run."""
    root = write_tiny_mnist(tmp_path / "data")
    labels = np.arange(256) % 10
    labels[250] = 12
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    code, output = train(root, tmp_path / "run", "--steps", 2, *TINY)
    assert code == 1 and output.strip() == (
        f"Error: the training split in {root}: item 250 is labelled 12, not a class 0-9 of this model (1 such label)"
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_run_records_its_images_and_resumes_only_on_them(finished_run: Path, tmp_path: Path) -> None:
    checkpoint = finished_run / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["train"]["train_images"] == 256
    bigger = write_tiny_mnist(tmp_path / "bigger", train_count=512)
    code, output = train(bigger, finished_run, "--resume", checkpoint, "--steps", 4)
    assert (code, output.strip()) == (
        1,
        f"Error: the resumed run trained on 256 images and {bigger} holds 512; resume with the --data-dir it "
        "trained on",
    )
    other = write_tiny_mnist(tmp_path / "other")  # as many images, one pixel changed
    images_file = other / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images = read_idx(images_file)
    images[100, 14, 14] ^= 0xFF
    write_idx(images_file, images)
    code, output = train(other, finished_run, "--resume", checkpoint, "--steps", 4)
    assert (code, output.strip()) == (
        1,
        f"Error: the resumed run trained on other images than the 256 in {other} (their sha256 differs); resume "
        "with the --data-dir it trained on",
    )
    assert train(write_tiny_mnist(tmp_path / "same"), finished_run, "--resume", checkpoint, "--steps", 4)[0] == 0


@pytest.mark.parametrize(
    "options", [(), ("--overwrite",), ("--resume", "{checkpoint}")], ids=["plain", "overwrite", "resume"]
)
def test_a_run_directory_another_process_trains_in_is_refused_and_untouched(
    finished_run: Path, tiny_mnist: Path, options: tuple[str, ...]
) -> None:
    """A job started twice, or a resume while the first run still trains: refused in one line, before its
    --overwrite can delete the live run's files. (The lock is taken here as another process takes it: flock
    locks belong to an open file, so this one conflicts with the CLI's in the same process too.)"""
    files = {path: path.read_bytes() for path in finished_run.rglob("*") if path.is_file()}
    held = os.open(finished_run, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        given = [option.format(checkpoint=finished_run / "checkpoint.pt") for option in options]
        code, output = train(tiny_mnist, finished_run, "--steps", 4, *TINY, *given)
    finally:
        os.close(held)
    assert (code, output.strip()) == (
        1,
        f"Error: another run is training in {finished_run} now; let it finish (or stop it), or give another --out",
    )
    assert {path: path.read_bytes() for path in finished_run.rglob("*") if path.is_file()} == files


@needs_flock
def test_the_run_directory_is_claimed_while_training_and_let_go_after(
    tmp_path: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from digitgen.training import loop

    claimed: list[bool] = []
    real_train = loop.train

    def train_and_look(state: object, data: object, run_dir: Path, **kwargs: object) -> object:
        look = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(look, fcntl.LOCK_SH | fcntl.LOCK_NB)
            claimed.append(False)
        except BlockingIOError:
            claimed.append(True)
        finally:
            os.close(look)
        return real_train(state, data, run_dir, **kwargs)

    monkeypatch.setattr(loop, "train", train_and_look)
    assert train(tiny_mnist, tmp_path / "run", "--steps", 2, *TINY)[0] == 0
    assert claimed == [True]
    monkeypatch.undo()
    code, output = train(tiny_mnist, tmp_path / "run", "--resume", tmp_path / "run" / "checkpoint.pt", "--steps", 3)
    assert code == 0, output


@needs_flock
def test_a_look_at_a_run_directory_does_not_refuse_another_look(tmp_path: Path) -> None:
    """Every process of a torchrun looks at once: shared locks, which only a training run's lock refuses."""
    looking = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(looking, fcntl.LOCK_SH)
        refuse_if_training(tmp_path)
    finally:
        os.close(looking)


def test_a_run_lock_lets_go_once_however_often_released_and_is_none_without_flock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = RunLock(tmp_path)
    if files.locking_available():
        with pytest.raises(RunDirectoryError, match="another run is training in"):
            RunLock(tmp_path)  # held: refused
    lock.release()
    with open(tmp_path / "other", "w") as other:  # likely given the descriptor the lock had
        lock.release()  # a second release closes nothing
        os.fstat(other.fileno())
    RunLock(tmp_path).release()  # the folder is free again
    monkeypatch.setattr(files, "fcntl", None)  # Windows
    unlocked = RunLock(tmp_path)
    RunLock(tmp_path).release()  # no lock, so nothing refused
    unlocked.release()
    unlocked.release()


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4014080000 bytes."),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.74 GiB."),
    ],
    ids=["cpu", "cuda"],
)
def test_a_step_that_does_not_fit_in_memory_is_one_line(
    tmp_path: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch, failure: RuntimeError
) -> None:
    def out_of_memory(*_args: object) -> None:
        raise failure

    monkeypatch.setattr("digitgen.training.loop.train_step", out_of_memory)
    code, output = train(tiny_mnist, tmp_path / "run", *TINY, "--steps", "2")
    assert code == 1
    assert output.splitlines()[-1] == (
        "Error: not enough memory: a training step of this size does not fit; lower --batch-size, --g-width or "
        "--d-width"
    )  # its own advice, once


@pytest.mark.parametrize("resumed", [False, True])
def test_a_model_that_does_not_fit_in_memory_is_one_line(
    finished_run: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch, resumed: bool
) -> None:
    """Built (or restored) before any step: it had ended in the allocator's traceback."""

    def out_of_memory(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("digitgen.training.state.Generator", out_of_memory)
    checkpoint = finished_run / "checkpoint.pt"
    args = ("--resume", checkpoint, "--steps", "4") if resumed else ("--steps", "2", *TINY)
    code, output = train(tiny_mnist, finished_run.parent / "other", *args)
    assert (code, output.splitlines()[-1]) == (
        1,
        f"Error: not enough memory: the model of {checkpoint} does not fit; resume it where more is free"
        if resumed
        else "Error: not enough memory: a model of these widths does not fit; lower --g-width or --d-width",
    )


def test_another_runtime_error_of_a_step_is_not_taken_for_memory(
    tmp_path: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*_args: object) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr("digitgen.training.loop.train_step", bug)
    result = CliRunner().invoke(main, ["train", "--data-dir", str(tiny_mnist), "--out", str(tmp_path / "run"), *TINY])
    assert isinstance(result.exception, RuntimeError) and "shapes cannot be multiplied" in str(result.exception)


@pytest.mark.parametrize(("value", "shown"), [(True, "on"), (False, "off"), (None, "none"), ("", "none"), (16, 16)])
def test_a_refusal_shows_a_kept_setting_as_a_user_reads_it(value: object, shown: object) -> None:
    assert _setting_text(value) == shown


@pytest.mark.parametrize(
    ("decay", "total", "per_epoch", "words"),
    [
        (
            None,
            3997,
            4000,
            "the learning-rate decay (--lr-decay-epochs 1e+300: more steps than any run) is longer than the run (3997 "
            "steps); for a run this short give --lr-decay-epochs 0.999 or less (the whole run is 0.999 epochs)",
        ),
        (
            4000,
            1,
            2000,
            "the learning-rate decay (--lr-decay-epochs 1e+300: 4000 steps) is longer than the run (1 steps); for a "
            "run this short leave out --lr-decay-epochs (the whole run is 0.0005 epochs), or train at least 4000 steps",
        ),
    ],
    ids=["more than any run, just under an epoch", "less than a thousandth of an epoch"],
)
def test_a_decay_longer_than_the_run_names_what_fits(decay: int | None, total: int, per_epoch: int, words: str) -> None:
    assert _decay_too_long(1e300, decay, total, per_epoch) == words


def test_an_earlier_run_without_grids_is_named_by_its_files_and_gone_files_are_not_an_error(tmp_path: Path) -> None:
    paths = (tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl")
    assert describe_run_files(paths) == "checkpoint.pt, metrics.jsonl"
    paths[0].write_bytes(b"")
    remove_run_files(paths)  # metrics.jsonl went meanwhile (another process, a user): nothing to do for it
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_whose_parents_are_missing_is_made_with_them(tmp_path: Path, tiny_mnist: Path) -> None:
    """As the README's first run does in a fresh clone: --out runs/first, with no runs/ yet."""
    run_dir = tmp_path / "runs" / "first"
    code, output = train(tiny_mnist, run_dir, "--steps", 1, *TINY)
    assert code == 0 and (run_dir / "checkpoint.pt").is_file(), output


def test_bf16_on_a_gpu_without_it_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(TrainingError) as caught:
        check_precision(TrainConfig(total_steps=1, precision="bf16"), torch.device("cuda"))
    assert str(caught.value) == "this GPU has no bfloat16 support for --precision bf16; train with --precision fp32"
    check_precision(TrainConfig(total_steps=1, precision="bf16"), torch.device("cpu"))  # a CPU runs bf16 everywhere


def test_a_training_split_of_no_images_is_one_line(tmp_path: Path) -> None:
    data = write_tiny_mnist(tmp_path / "data", train_count=0)
    code, output = train(data, tmp_path / "run", "--steps", 2, *TINY)
    assert (code, output.strip().splitlines()) == (1, [f"Error: the training split in {data} holds no images"])
    assert not (tmp_path / "run").exists()


def test_an_overwrite_of_a_run_that_replaced_one_left_aside_sets_aside_the_latest(
    finished_run: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that saved its checkpoint but could not delete the run it replaced: that one is the stale one."""
    before = _files(finished_run)
    stale = finished_run / REPLACED_DIR
    (stale / "samples").mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"step": 50}\n')
    (stale / "samples" / "step0000050.png").write_bytes(b"the run replaced before")
    monkeypatch.setattr(loop, "save_checkpoint", _disk_full)
    code, output = train(tiny_mnist, finished_run, "--steps", 3, "--seed", 7, "--overwrite", *TINY)
    assert code == 1, output
    assert _files(finished_run) == before and not stale.exists()  # the latest run back, the stale one gone


def test_an_earlier_run_that_cannot_be_set_aside_is_left_whole(
    finished_run: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _files(finished_run)
    moved: list[Path] = []
    real_move = run._move

    def second_fails(source: Path, target: Path) -> None:
        if moved:
            raise OSError(5, "Input/output error")
        moved.append(source)
        real_move(source, target)

    monkeypatch.setattr(run, "_move", second_fails)
    code, output = train(tiny_mnist, finished_run, "--steps", 3, "--overwrite", *TINY)
    assert code == 1 and "cannot set the earlier run aside" in output, output
    assert _files(finished_run) == before


def test_overwrite_of_an_empty_folder_says_nothing_of_an_earlier_run(tmp_path: Path, tiny_mnist: Path) -> None:
    code, output = train(tiny_mnist, tmp_path / "fresh", "--steps", 2, "--overwrite", *TINY)
    assert code == 0 and output.splitlines()[0].startswith("training on cpu"), output


def test_a_set_aside_run_the_first_save_could_not_delete_goes_at_the_end(
    finished_run: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "drop_replaced", lambda run_dir: None)  # as if its rmtree had failed then
    code, output = train(tiny_mnist, finished_run, "--steps", 3, "--overwrite", *TINY)
    assert code == 0, output
    assert not (finished_run / REPLACED_DIR).exists()


def test_a_link_where_the_run_is_set_aside_is_refused(finished_run: Path, tiny_mnist: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (finished_run / REPLACED_DIR).symlink_to(elsewhere)
    before = _files(finished_run)
    code, output = train(tiny_mnist, finished_run, "--steps", 3, "--overwrite", *TINY)
    assert (code, output.strip()) == (
        1,
        f"Error: {finished_run / REPLACED_DIR} is not a folder, where --overwrite sets an earlier run aside; move it",
    )
    assert _files(finished_run) == before and list(elsewhere.iterdir()) == []


def test_settling_follows_no_link(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "metrics.jsonl").write_text("someone's")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / REPLACED_DIR).symlink_to(elsewhere)
    settle_aside(run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (elsewhere / "metrics.jsonl").read_text() == "someone's"


def test_a_stopped_runs_lines_do_not_join_an_overwrite_that_resumes_another_run(
    finished_run: Path, tiny_mnist: Path, tmp_path: Path
) -> None:
    """An --overwrite killed after its first step, then one that resumes another run: the first one's lines go."""
    other = tmp_path / "other"
    assert train(tiny_mnist, other, "--steps", 2, *TINY)[0] == 0
    set_aside(earlier_run_files(finished_run), finished_run)  # an --overwrite killed ...
    (finished_run / "metrics.jsonl").write_text('{"step": 1}\n')  # ... after its first step
    code, output = train(tiny_mnist, finished_run, "--overwrite", "--resume", other / "checkpoint.pt", "--steps", 3)
    assert code == 0, output
    assert _metrics_steps(finished_run) == [3]

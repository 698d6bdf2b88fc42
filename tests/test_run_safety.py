"""A run directory is never replaced or mixed by accident, and --resume honours or refuses every option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from digitgen.cli import main

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
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_into_a_run_directory_is_refused(finished_run: Path, tiny_mnist: Path) -> None:
    before = (finished_run / "checkpoint.pt").read_bytes()
    code, output = train(tiny_mnist, finished_run, "--steps", 2, *TINY)
    assert code == 1
    assert output.strip().splitlines() == [
        f"Error: {finished_run} already holds a run (checkpoint.pt, metrics.jsonl, samples); continue it with "
        f"--resume {finished_run / 'checkpoint.pt'} or start over with --overwrite"
    ]
    assert (finished_run / "checkpoint.pt").read_bytes() == before


def test_overwrite_starts_over_and_says_what_it_deleted(finished_run: Path, tiny_mnist: Path) -> None:
    (finished_run / "samples" / "mine.png").write_bytes(b"old grid")
    code, output = train(tiny_mnist, finished_run, "--steps", 3, "--overwrite", *TINY)
    assert code == 0, output
    assert "--overwrite: deleted the earlier run's" in output and "metrics.jsonl" in output
    assert not (finished_run / "samples" / "mine.png").exists()
    steps = _metrics_steps(finished_run)
    assert steps == sorted(set(steps)) and torch.load(finished_run / "checkpoint.pt", weights_only=True)["step"] == 3


def test_resume_continues_the_run_in_place(finished_run: Path, tiny_mnist: Path) -> None:
    code, output = train(tiny_mnist, finished_run, "--resume", finished_run / "checkpoint.pt", "--steps", 4)
    assert code == 0, output
    assert torch.load(finished_run / "checkpoint.pt", weights_only=True)["step"] == 4


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
        ("--lr-d", "0.0004", "None"),
        ("--seed", "5", "0"),
        ("--latent-dim", "16", "8"),
        ("--conditional-norm", None, "False"),
        ("--d-width", "32", "64"),
        ("--adc-weight", "0.5", "0.0"),
    ],
)
def test_resume_refuses_options_that_would_change_the_run(
    finished_run: Path, tiny_mnist: Path, option: str, value: str | None, kept: str
) -> None:
    before = (finished_run / "checkpoint.pt").read_bytes()
    given = (option,) if value is None else (option, value)
    code, output = train(tiny_mnist, finished_run, "--resume", finished_run / "checkpoint.pt", "--steps", 4, *given)
    assert code == 1
    assert output.startswith(f"Error: {' '.join(given)} differs from the resumed run's {kept};"), output
    assert (finished_run / "checkpoint.pt").read_bytes() == before


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
        "--checkpoint-every",
        1,
    )
    assert code == 0, output
    assert torch.load(finished_run / "checkpoint.pt", weights_only=True)["train"]["checkpoint_every"] == 1


def test_discriminator_width_and_adc_weight_are_kept_in_the_checkpoint(tmp_path: Path, tiny_mnist: Path) -> None:
    run_dir = tmp_path / "run"
    code, output = train(tiny_mnist, run_dir, "--steps", 2, *TINY, "--d-width", 24, "--adc-weight", 0.25)
    assert code == 0, output
    assert "ADC classifier weight 0.25" in output
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["config"]["d_width"] == 24 and saved["train"]["adc_weight"] == 0.25
    assert saved["discriminator"]["features.0.parametrizations.weight.original"].shape[0] == 24
    assert saved["discriminator"]["classifier.parametrizations.weight.original"].shape == (20, 4 * 24 * 16)
    code, output = train(tiny_mnist, run_dir, "--resume", run_dir / "checkpoint.pt", "--steps", 3)
    assert code == 0, output
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 3

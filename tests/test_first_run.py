"""The README's training section works as written after its install command, its first run included, and a
learning-rate decay longer than a short run is refused with the fix."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from digitgen.cli import main
from tests.conftest import REPO

TINY = ("--batch-size", "16", "--latent-dim", "8", "--device", "cpu")
VENV = ".venv-dev/bin/"


def _section(title: str) -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _commands(text: str) -> list[str]:
    """The command lines of the bash blocks in ``text`` (comments and blank lines left out)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _run(*args: object) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result.exit_code, result.output.strip().splitlines()


def test_a_decay_longer_than_the_run_names_the_fix(tmp_path: Path, tiny_mnist: Path) -> None:
    common = ("train", "--data-dir", tiny_mnist, *TINY, "--steps", 4)  # 256 images: 16 steps per epoch
    code, lines = _run(*common, "--out", tmp_path / "a", "--lr-decay-epochs", 10)
    assert code == 1
    assert lines == [
        "Error: the learning-rate decay (--lr-decay-epochs 10: 160 steps) is longer than the run (4 steps); "
        "for a run this short give --lr-decay-epochs 0.25 or less (the whole run is 0.25 epochs), "
        "or train at least 160 steps"
    ]
    assert not (tmp_path / "a").exists()
    code, lines = _run(*common, "--out", tmp_path / "b", "--lr-decay-epochs", 0.25)
    assert code == 0, lines
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert saved["train"]["lr_decay_steps"] == 4


def test_training_commands_use_the_environment_of_install_command_2() -> None:
    readme = (REPO / "README.md").read_text()
    command_2 = 'python3 -m venv .venv-dev && .venv-dev/bin/pip install torch==2.14.1 torchvision==0.29.1 -e ".[dev]"'
    assert command_2 in readme
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"digitgen-mnist[train]"' in pyproject.split("dev = [", 1)[1].split("]\n", 1)[0]
    commands = _commands(_section("Train, export, verify"))
    assert len(commands) >= 8
    for command in commands:
        assert command.startswith(VENV), f"names no environment: {command}"
        assert "pip install" not in command, command
        tool = shlex.split(command)[0].removeprefix(VENV)
        assert (Path(sys.executable).parent / tool).exists(), f"{tool} is not in the dev environment"


def test_readme_first_run_works_as_written(tmp_path: Path, tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first-run block verbatim, on the tiny dataset and for 2 steps, in a scratch folder."""
    section = _section("Train, export, verify")
    first_run = section.split("**A first run**", 1)[1]
    commands = _commands(first_run.split("```\n", 2)[0] + "```\n")
    assert [shlex.split(c)[2] for c in commands] == ["train", "export", "verify", "generate"]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = shlex.split(command)
        assert args[:2] == [f"{VENV}python", "cli.py"], command
        args = args[2:]
        if "--steps" in args:
            args[args.index("--steps") + 1] = "2"
        if "--data-dir" in args:
            assert args[args.index("--data-dir") + 1] == "../shared/datasets"
            args[args.index("--data-dir") + 1] = str(tiny_mnist)
        code, lines = _run(*args)
        assert code == 0, f"{command}: {lines}"
    (sheet,) = (tmp_path / "runs").rglob("grid.png")
    with Image.open(sheet) as image:
        assert image.size == (302, 302)


def test_readme_shows_the_first_run_grid() -> None:
    first_run = _section("Train, export, verify").split("**A first run**", 1)[1].split("**", 1)[0]
    (picture,) = re.findall(r"!\[[^\]]+\]\((artifacts/[\w.]+\.png)\)", first_run)
    with Image.open(REPO / picture) as image:
        assert image.format == "PNG" and image.size == (302, 302)
    assert (REPO / picture).stat().st_size < 100_000

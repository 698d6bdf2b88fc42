"""benchmarks/train.py: the recipes it times to quality, and options of one mode refused in the other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmarks.train import RECIPES, main, recipe_options

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 60_000 // 128


def test_the_shipped_recipe_is_the_one_the_shipped_weights_were_trained_with() -> None:
    shipped = torch.load(REPO / "artifacts" / "generator_weights.pt", weights_only=True)
    recipe, trained = RECIPES["shipped"], shipped["train"]
    assert recipe["epochs"] * STEPS_PER_EPOCH == trained["total_steps"]
    assert recipe["lr_decay_epochs"] * STEPS_PER_EPOCH == trained["lr_decay_steps"]
    assert recipe["conditional_norm"] is shipped["config"]["conditional_norm"]
    names = ("lr_d", "adc_weight", "label_weight", "label_weight_falls", "label_digit_weights", "precision", "seed")
    for name in names:
        assert recipe[name] == trained[name], name


def test_the_shipped_recipe_takes_its_label_classifier_from_the_command_line() -> None:
    assert recipe_options("shipped", "label.pt") == {**RECIPES["shipped"], "label_classifiers": ("label.pt",)}
    assert recipe_options("previous", None) == RECIPES["previous"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--to-quality", "0.95", "5"], "the shipped recipe needs --label-classifier"),
        (["--to-quality", "0.9", "5", "--recipe", "previous", "--label-classifier", "{tmp}/x.pt"], "no label"),
        (["--to-quality", "0.9", "5", "--steps", "3", "--rounds", "1"], "--steps, --rounds: not used with"),
        (["--recipe", "previous", "--eval-every", "10"], "--recipe, --eval-every: not used without --to-quality"),
    ],
)
def test_options_that_would_be_ignored_or_are_missing_are_refused(
    arguments: list[str], message: str, tmp_path: Path
) -> None:
    (tmp_path / "x.pt").touch()
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    result = CliRunner().invoke(main, ["--data-dir", str(tmp_path), *arguments])
    assert result.exit_code == 2
    assert message in result.output

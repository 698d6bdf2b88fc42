"""benchmarks/ablation.py: each variant is the shipped recipe with one change, in options `train` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.ablation import VARIANTS, train_arguments, training_seconds
from digitgen.cli import train


def _options(arguments: list[str]) -> dict[str, object]:
    """What `digitgen train` makes of the arguments (parsed, not run)."""
    return train.make_context("train", list(arguments)).params


def test_the_shipped_recipe_scales_its_decay_to_half_the_epochs() -> None:
    options = _options(train_arguments("shipped", 20, 1))
    assert options["epochs"] == 20 and options["lr_decay_epochs"] == 10 and options["seed"] == 1
    assert options["conditional_norm"] is True and options["lr_d"] == 4e-4
    assert options["d_width"] is None and options["adc_weight"] is None


@pytest.mark.parametrize(
    ("variant", "changed"),
    [
        ("no-cbn", {"conditional_norm": None}),
        ("no-lr-d", {"lr_d": None}),
        ("decay-quarter", {"lr_decay_epochs": 1.25}),
        ("wide-d", {"d_width": 96}),
        ("adc", {"adc_weight": 0.5}),
        ("shipped-seed2", {"seed": 2}),
    ],
)
def test_each_variant_changes_one_thing(variant: str, changed: dict[str, object]) -> None:
    shipped, options = _options(train_arguments("shipped", 5, 1)), _options(train_arguments(variant, 5, 1))
    assert {name: value for name, value in options.items() if shipped[name] != value} == changed


def test_every_variant_is_tested() -> None:
    assert set(VARIANTS) == {"shipped", "no-cbn", "no-lr-d", "decay-quarter", "wide-d", "adc", "shipped-seed2"}


def test_training_seconds_add_up_the_logged_windows(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    windows = [(50, 100.0), (100, 200.0), (110, 64.0)]  # (step, images/s)
    metrics.write_text("".join(json.dumps({"step": s, "images_per_s": rate}) + "\n" for s, rate in windows))
    assert training_seconds(metrics, batch_size=128) == pytest.approx(50 * 128 / 100 + 50 * 128 / 200 + 10 * 128 / 64)

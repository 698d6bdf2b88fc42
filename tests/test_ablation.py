"""benchmarks/ablation.py: each variant changes one thing (a seed variant: the seed), in options `train` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.ablation import VARIANTS, table_rows, train_arguments, training_seconds
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
    ("variant", "baseline", "changed"),
    [
        ("no-cbn", "shipped", {"conditional_norm": None}),
        ("no-lr-d", "shipped", {"lr_d": None}),
        ("decay-quarter", "shipped", {"lr_decay_epochs": 1.25}),
        ("wide-d", "shipped", {"d_width": 96}),
        ("adc", "shipped", {"adc_weight": 0.5}),
        ("shipped-seed2", "shipped", {"seed": 2}),
        ("adc-seed2", "adc", {"seed": 2}),
        ("label", "shipped", {"label_weight": 0.5, "label_classifiers": ("label.pt",)}),
    ],
)
def test_each_variant_changes_one_thing(variant: str, baseline: str, changed: dict[str, object]) -> None:
    label = Path("label.pt")
    before, options = _options(train_arguments(baseline, 5, 1, label)), _options(train_arguments(variant, 5, 1, label))
    assert {name: value for name, value in options.items() if before[name] != value} == changed


def test_every_variant_is_tested() -> None:
    seed_variants = {"shipped-seed2", "adc-seed2"}
    assert set(VARIANTS) == {"shipped", "no-cbn", "no-lr-d", "decay-quarter", "wide-d", "adc", "label", *seed_variants}


def test_the_label_variant_needs_its_classifier_weights() -> None:
    with pytest.raises(ValueError, match="label needs classifier weights"):
        train_arguments("label", 5, 1)


def test_training_seconds_add_up_the_logged_windows(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    windows = [(50, 100.0), (100, 200.0), (110, 64.0)]  # (step, images/s)
    metrics.write_text("".join(json.dumps({"step": s, "images_per_s": rate}) + "\n" for s, rate in windows))
    assert training_seconds(metrics, batch_size=128) == pytest.approx(50 * 128 / 100 + 50 * 128 / 200 + 10 * 128 / 64)


def _scores(accuracies: list[float], fid: float, cas: float, cas_images: int) -> dict:
    generated = {"class_accuracy": sum(accuracies) / 10, "per_digit_accuracy": accuracies, "fid": fid}
    real = {"fid": 4.0, "precision": 0.9, "recall": 0.8}
    generated |= {"precision": 0.45, "recall": 0.6}
    return {"generated": generated, "real": real, "cas_generated": cas, "cas_images": cas_images, "train_seconds": 90}


def test_table_rows_hold_ratios_worst_digit_and_the_cas_gap_of_like_sized_training(tmp_path: Path) -> None:
    (tmp_path / "real_cas.json").write_text(json.dumps({"real": 0.99, "cas_images": 20_000}))
    for name, cas_images in (("shipped", 20_000), ("adc", 60_000)):
        (tmp_path / name).mkdir()
        accuracies = [1.0] * 10
        accuracies[7] = 0.9
        (tmp_path / name / "scores.json").write_text(json.dumps(_scores(accuracies, 10.0, 0.98, cas_images)))
    shipped, adc = table_rows(tmp_path)
    assert shipped["variant"] == "shipped" and adc["variant"] == "adc"
    assert (shipped["worst_digit"], shipped["worst_accuracy"]) == (7, 0.9)
    assert [shipped[k] for k in ("fid_ratio", "precision_ratio", "recall_ratio")] == pytest.approx([2.5, 0.5, 0.75])
    assert shipped["cas_gap"] == pytest.approx(1.0) and shipped["train_minutes"] == 1.5
    assert adc["cas_gap"] is None  # its classifier saw more images than the real-data one

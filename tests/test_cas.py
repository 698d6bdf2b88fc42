"""`evaluate --cas`: train on generated digits, test on real ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import digitgen.training.cas as cas_module
from digitgen.cli import main
from digitgen.runtime import DigitGenerator
from digitgen.runtime.evaluate import Cas, Evaluation
from digitgen.runtime.idx import read_mnist_split
from digitgen.training.cas import cas_work, classification_accuracy_score
from digitgen.training.classifier import ClassifierResult, training_steps
from tests.test_evaluate import _scores, evaluate_args


class RecordingTrainer:
    """Stands in for ``train_classifier``: remembers its training sets, returns set accuracies."""

    def __init__(self, accuracies: list[float]) -> None:
        self.accuracies, self.seen = iter(accuracies), []

    def __call__(self, train, test, *, epochs, seed, progress):
        self.seen.append((train, test, epochs, seed))
        total = training_steps(len(train.images), epochs)
        for step in range(total):
            progress(step + 1, total)
        return ClassifierResult(model=None, test_accuracy=next(self.accuracies), seconds=0.0, step=total)


@pytest.fixture
def trainer(monkeypatch: pytest.MonkeyPatch) -> RecordingTrainer:
    """CAS's classifier training, recorded: 91% on the generated digits, then 98% on the real ones."""
    recording = RecordingTrainer([0.91, 0.98])
    monkeypatch.setattr(cas_module, "train_classifier", recording)
    return recording


def test_cas_trains_on_generated_then_real_digits_and_tests_on_real(
    tiny_onnx: Path, tiny_mnist: Path, trainer: RecordingTrainer
) -> None:
    gen = DigitGenerator.from_path(tiny_onnx, "cpu")
    train, test = read_mnist_split(tiny_mnist, "train"), read_mnist_split(tiny_mnist, "t10k")
    steps = []
    result = classification_accuracy_score(
        gen, train, test, seed=4, truncation=1.5, per_class=130, epochs=2, progress=lambda: steps.append(1)
    )
    assert result == Cas(generated=0.91, real=0.98, num_generated=1300, num_real=len(train[0]), epochs=2)
    assert round(result.gap, 6) == 7.0
    (fake, fake_test, epochs, seed), (real, real_test, _, real_seed) = trainer.seen
    expected = gen.generate(1300, seed=4, truncation=1.5)
    assert np.array_equal(fake.images.numpy(), expected.images)
    assert np.bincount(fake.labels.numpy()).tolist() == [130] * 10
    assert np.array_equal(real.images.numpy(), train[0]) and np.array_equal(real.labels.numpy(), train[1])
    for split in (fake_test, real_test):
        assert np.array_equal(split.images.numpy(), test[0]) and np.array_equal(split.labels.numpy(), test[1])
    assert (epochs, seed) == (2, real_seed)
    assert len(steps) == cas_work(len(train[0]), per_class=130, epochs=2)


def test_cas_draws_seed_0_by_default_and_takes_labels_of_any_integer_type(
    tiny_onnx: Path, tiny_mnist: Path, trainer: RecordingTrainer
) -> None:
    gen = DigitGenerator.from_path(tiny_onnx, "cpu")
    (images, labels), test = read_mnist_split(tiny_mnist, "train"), read_mnist_split(tiny_mnist, "t10k")
    classification_accuracy_score(gen, (images, labels.astype(np.uint8)), test, per_class=13, epochs=1)
    (fake, *_), (real, *_) = trainer.seen
    assert np.array_equal(fake.images.numpy(), gen.generate(130, seed=0).images)  # as `evaluate --cas` by default
    assert real.labels.dtype == torch.int64 and np.array_equal(real.labels.numpy(), labels)  # what the loss takes


def test_cas_with_the_real_trainer_gives_accuracies(tiny_onnx: Path, tiny_mnist: Path) -> None:
    gen = DigitGenerator.from_path(tiny_onnx, "cpu")
    train, test = read_mnist_split(tiny_mnist, "train"), read_mnist_split(tiny_mnist, "t10k")
    result = classification_accuracy_score(gen, train, test, per_class=26, epochs=1)
    assert result.num_generated == 260 and 0 <= result.generated <= 1 and 0 <= result.real <= 1


def test_table_and_json_carry_cas() -> None:
    cas = Cas(generated=0.9874, real=0.9951, num_generated=60_000, num_real=60_000, epochs=4)
    evaluation = Evaluation(_scores(0.99, 15.4, 0.912, 0.885), _scores(0.997, 3.3, 0.944, 0.955), cas)
    row = "| CAS (trained on 60000 / 60000, tested on MNIST test) | 98.74% | 99.51% | 0.77 points below real |"
    assert row in evaluation.table().splitlines()
    assert evaluation.to_dict()["cas"] == {
        "generated": 0.9874,
        "real": 0.9951,
        "num_generated": 60_000,
        "num_real": 60_000,
        "epochs": 4,
    }
    assert "CAS" not in Evaluation(evaluation.generated, evaluation.real).table()


def test_evaluate_cas_cli(tiny_onnx: Path, tiny_classifier: Path, tiny_mnist: Path, monkeypatch) -> None:
    monkeypatch.setattr(cas_module, "train_classifier", RecordingTrainer([0.5, 0.75]))
    result = CliRunner().invoke(main, [*evaluate_args(tiny_onnx, tiny_classifier, tiny_mnist), "--cas", "--json"])
    assert result.exit_code == 0, result.output
    cas = json.loads(result.output.strip().splitlines()[-1])["cas"]
    assert cas == {"generated": 0.5, "real": 0.75, "num_generated": 60_000, "num_real": 256, "epochs": 4}

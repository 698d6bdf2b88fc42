"""Classification accuracy score (Ravuri & Vinyals 2019): train a classifier on generated digits,
test it on real ones, beside the same recipe trained on real digits."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from digitgen.runtime.evaluate import Cas
from digitgen.runtime.generator import DigitGenerator
from digitgen.training.classifier import train_classifier, training_steps
from digitgen.training.data import MnistTensors

PER_CLASS = 6_000  # 60,000 generated digits, as many as MNIST's training set
EPOCHS = 4  # the reference classifier's recipe (`train-classifier --epochs 4`)
CLASSIFIER_SEED = 0

Split = tuple[np.ndarray, np.ndarray]


def cas_work(num_real: int, per_class: int = PER_CLASS, epochs: int = EPOCHS) -> int:
    """Optimizer steps of :func:`classification_accuracy_score` (its ``progress`` total)."""
    return training_steps(10 * per_class, epochs) + training_steps(num_real, epochs)


def _tensors(split: Split) -> MnistTensors:
    return MnistTensors(torch.tensor(split[0]), torch.tensor(split[1], dtype=torch.int64))


def accuracy_when_trained_on(
    train: Split, test: Split, *, epochs: int = EPOCHS, progress: Callable[[], None] = lambda: None
) -> float:
    """MNIST ``test`` accuracy of the reference architecture trained on ``train`` (CAS's recipe and seed)."""
    result = train_classifier(
        _tensors(train), _tensors(test), epochs=epochs, seed=CLASSIFIER_SEED, progress=lambda done, total: progress()
    )
    return result.test_accuracy


def classification_accuracy_score(
    generator: DigitGenerator,
    train: Split,
    test: Split,
    *,
    seed: int = 0,
    truncation: float | None = None,
    per_class: int = PER_CLASS,
    epochs: int = EPOCHS,
    progress: Callable[[], None] = lambda: None,
) -> Cas:
    """Test accuracy of the reference architecture trained on ``10 * per_class`` generated digits
    (noise ``seed``, digits 0-9 in turn) and, with the same recipe and seed, on the real ``train``."""
    fake = generator.generate(10 * per_class, seed=seed, truncation=truncation)
    on_generated = accuracy_when_trained_on((fake.images, fake.labels), test, epochs=epochs, progress=progress)
    on_real = accuracy_when_trained_on(train, test, epochs=epochs, progress=progress)
    return Cas(
        generated=on_generated,
        real=on_real,
        num_generated=10 * per_class,
        num_real=len(train[0]),
        epochs=epochs,
    )

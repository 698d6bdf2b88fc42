"""Class accuracy by a second, unrelated reader: a 3-nearest-neighbour vote over MNIST's raw pixels.

    python benchmarks/knn_accuracy.py [--data-dir ../shared/datasets] MODEL.onnx [MODEL.onnx ...]

``digitgen evaluate`` reads the digits with the reference CNN. A generator trained against a classifier
of that kind (``train --label-classifier``) may partly learn what such classifiers agree on. A k-NN vote
over the 60,000 real training images shares no weights and no architecture with either, so a gain it
sees too is a gain in the digits. It scores MNIST's test set first (its own accuracy on real digits),
then each model's ``evaluate`` sample: 10,000 digits, classes 0-9 in turn, seed 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from digitgen.runtime.evaluate import label_accuracy  # noqa: E402
from digitgen.runtime.generator import DigitGenerator  # noqa: E402
from digitgen.runtime.idx import read_idx  # noqa: E402

NEIGHBOURS = 3


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255


def knn_predict(train_images: np.ndarray, train_labels: np.ndarray, images: np.ndarray) -> np.ndarray:
    """The label most of the 3 nearest training images (Euclidean, raw pixels) carry; the nearest's on a 3-way tie."""
    reference = _flat(train_images)
    reference_sq = (reference**2).sum(1)
    predictions = []
    for chunk in np.array_split(_flat(images), max(1, len(images) // 500)):
        distances = reference_sq[None, :] - 2 * chunk @ reference.T  # |a-b|^2 less |a|^2, the same for a row
        # every k-th of range(NEIGHBOURS) in its sorted place: the nearest first, then the next two
        nearest = np.argpartition(distances, range(NEIGHBOURS), axis=1)[:, :NEIGHBOURS]
        votes = train_labels[nearest]
        predictions.append(np.where(votes[:, 1] == votes[:, 2], votes[:, 1], votes[:, 0]))
    return np.concatenate(predictions)


def _line(name: str, predictions: np.ndarray, labels: np.ndarray) -> str:
    overall, per_digit = label_accuracy(predictions, labels)
    worst = int(np.argmin(per_digit))
    return f"{name}: {overall:.2%}, worst digit {per_digit[worst]:.1%} ({worst})"


@click.command()
@click.option("--data-dir", default="../shared/datasets", show_default=True, help="torchvision root (MNIST/raw/).")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def main(data_dir: str, models: tuple[str, ...]) -> None:
    raw = Path(data_dir) / "MNIST" / "raw"
    train_images, train_labels = read_idx(raw / "train-images-idx3-ubyte"), read_idx(raw / "train-labels-idx1-ubyte")
    print(f"machine: {describe()}; {NEIGHBOURS}-NN over {len(train_labels):,} real training images")
    test_labels = read_idx(raw / "t10k-labels-idx1-ubyte")
    test_predictions = knn_predict(train_images, train_labels, read_idx(raw / "t10k-images-idx3-ubyte"))
    print(_line("MNIST test (real)", test_predictions, test_labels), flush=True)
    for model in models:
        digits = DigitGenerator.from_path(model).generate(10_000, seed=0)
        print(_line(model, knn_predict(train_images, train_labels, digits.images), digits.labels), flush=True)


if __name__ == "__main__":
    main()

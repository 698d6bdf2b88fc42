"""The k-NN cross-check of class accuracy (benchmarks/knn_accuracy.py)."""

from __future__ import annotations

import numpy as np

from benchmarks.knn_accuracy import knn_predict


def _images(values: list[float]) -> np.ndarray:
    """One 28x28 image per value, every pixel that value: distances are |a - b| * 28."""
    return np.array([np.full((28, 28), v) for v in values], dtype=np.uint8)


def test_two_agreeing_neighbours_outvote_the_nearest() -> None:
    train = _images([100, 104, 105, 200])
    labels = np.array([3, 7, 7, 1])
    assert knn_predict(train, labels, _images([101])).tolist() == [7]


def test_three_different_neighbours_give_the_nearest_label() -> None:
    train = _images([100, 110, 90, 250, 0])
    labels = np.array([4, 5, 6, 8, 9])
    assert knn_predict(train, labels, _images([92, 108])).tolist() == [6, 5]


def test_predictions_keep_the_order_of_many_images() -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 10, 1200)
    train = _images([25.0 * v for v in range(10)] * 3)
    labels = np.tile(np.arange(10), 3)
    assert knn_predict(train, labels, _images([25.0 * v + 3 for v in values])).tolist() == values.tolist()

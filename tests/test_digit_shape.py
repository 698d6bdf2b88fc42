"""Recall by digit and the size of each digit's box (benchmarks/digit_shape.py)."""

from __future__ import annotations

import numpy as np

from benchmarks.digit_shape import box_sides, recall_by_digit
from digitgen.runtime.evaluate import knn_radii


def test_box_side_is_the_larger_side_above_the_threshold() -> None:
    image = np.zeros((28, 28), dtype=np.uint8)
    image[4:24, 10:16] = 200  # 20 rows by 6 columns
    image[2, 2] = 1  # one faint pixel: counts above 0, not above 127
    assert box_sides(image[None], 127).tolist() == [20]
    assert box_sides(image[None], 0).tolist() == [22]  # rows 2-23: the box, not the rows with ink (21)
    assert box_sides(image.T[None], 127).tolist() == [20]
    assert box_sides(np.zeros((1, 28, 28), dtype=np.uint8), 0).tolist() == [0]


def test_recall_by_digit_counts_each_class_of_the_reference_on_its_own() -> None:
    rng = np.random.default_rng(0)
    generated = rng.normal(0.0, 1.0, (50, 2))  # covers only the cluster at the origin
    reference = np.concatenate([rng.normal(0.0, 0.3, (20, 2)), rng.normal(50.0, 0.3, (90, 2))])
    labels = np.array([0] * 20 + [1 + i % 9 for i in range(90)])  # class 0 at the origin, 1-9 far away
    assert recall_by_digit(generated, knn_radii(generated), reference, labels) == [1.0] + [0.0] * 9

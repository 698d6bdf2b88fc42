"""The misread comparison of two classifiers (benchmarks/misreads.py)."""

from __future__ import annotations

import numpy as np

from benchmarks.misreads import misread_report


def _confident(reads: list[int], right_probability: list[float] | None = None) -> np.ndarray:
    """Probabilities over 10 classes reading each digit as ``reads``; optionally the right digit's (class 0's) share."""
    probabilities = np.full((len(reads), 10), 0.0)
    probabilities[np.arange(len(reads)), reads] = 1.0
    if right_probability is not None:
        probabilities[:, 0] = right_probability
    return probabilities


def test_counts_each_classifier_s_misreads_both_and_what_they_were_read_as() -> None:
    labels = np.array([7, 7, 7, 4, 4, 1])
    evaluator = _confident([9, 9, 2, 9, 4, 1])  # three sevens and a four misread, one four and the one right
    second = _confident([7, 9, 7, 9, 4, 8])  # agrees on one seven and the four; misreads the one
    report = misread_report(labels, evaluator, second)
    assert report[0] == "evaluator misreads 4 of 6, the second classifier 3, both 2"
    assert report[2:] == ["digit 4: 1 misread (1 as 9)", "digit 7: 3 misread (1 as 2, 2 as 9)"]


def test_gives_the_second_classifier_s_probability_of_the_right_digit_on_the_evaluator_s_misreads() -> None:
    labels = np.zeros(5, dtype=np.int64)
    evaluator = _confident([3, 3, 3, 3, 0])  # four misread, the last right
    second = _confident([0, 0, 0, 0, 0], right_probability=[0.2, 0.6, 0.96, 0.99, 0.01])
    report = misread_report(labels, evaluator, second)
    assert report[1] == (
        "on the evaluator's misreads the second classifier gives the right digit a median probability of "
        "0.78, over 0.5 on 3, over 0.9 on 2"
    )


def test_no_misreads_leave_one_line() -> None:
    labels = np.arange(10)
    assert misread_report(labels, _confident(list(range(10))), _confident(list(range(10)))) == [
        "evaluator misreads 0 of 10, the second classifier 0, both 0"
    ]

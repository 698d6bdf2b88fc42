"""Timing shared by the benchmarks."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def interleaved_medians(measurements: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each measurement over ``rounds`` rounds that take every measurement in turn, so that
    drift of the machine's speed hits all of them alike."""
    values: dict[str, list[float]] = {name: [] for name in measurements}
    for _ in range(rounds):
        for name, measure in measurements.items():
            values[name].append(measure())
    return {name: statistics.median(v) for name, v in values.items()}

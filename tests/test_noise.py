"""The portable noise scheme: exactly its documented definition, standard normal, batch-independent."""

from __future__ import annotations

import math

import numpy as np
import pytest

from digitgen.runtime.noise import (
    MAX_SEED,
    MIN_TRUNCATION,
    NOISE_SCHEME,
    NoiseSpan,
    standard_normal,
    standard_normal_spans,
)

MASK = 2**64 - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def reference_noise(seed: int, index: int, size: int) -> list[float]:
    """The scheme as the module docstring and the README define it, one integer at a time."""
    key = _mix(_mix((seed + GOLDEN) & MASK) ^ ((index * GOLDEN) & MASK))
    uniform = [((_mix((key + (c + 1) * GOLDEN) & MASK) >> 11) + 0.5) / 2**53 for c in range(size + size % 2)]
    z = []
    for p in range(0, len(uniform), 2):
        radius, angle = math.sqrt(-2.0 * math.log(uniform[p])), 2.0 * math.pi * uniform[p + 1]
        z += [radius * math.cos(angle), radius * math.sin(angle)]
    return z[:size]


@pytest.mark.parametrize(("seed", "index", "size"), [(0, 0, 64), (1, 5, 8), (12345, 1000, 7), (MAX_SEED, 2**40, 64)])
def test_vectorised_noise_is_the_documented_scheme(seed: int, index: int, size: int) -> None:
    expected = np.asarray(reference_noise(seed, index, size), dtype=np.float32)
    assert np.array_equal(standard_normal(seed, index, index + 1, size)[0], expected)


def test_noise_of_version_1_never_changes() -> None:
    """Pinned values (the browser tests use them too): changing the scheme needs a new NOISE_SCHEME."""
    assert NOISE_SCHEME == "splitmix64-boxmuller-v1"
    pinned = [-0.17660188674926758, 1.4621628522872925, -1.60213303565979, 0.20066267251968384]
    assert standard_normal(0, 0, 1, 4)[0].tolist() == pinned


def test_noise_of_an_index_does_not_depend_on_the_range_it_is_drawn_in() -> None:
    whole = standard_normal(3, 0, 3000, 5)
    assert np.array_equal(standard_normal(3, 1000, 2100, 5), whole[1000:2100])
    assert np.array_equal(standard_normal(3, 2999, 3000, 5), whole[2999:])


def test_noise_is_standard_normal() -> None:
    z = standard_normal(2026, 0, 4000, 64).astype(np.float64)
    values = np.sort(z.ravel())
    assert abs(values.mean()) < 0.01 and abs(values.var() - 1.0) < 0.01
    normal_cdf = 0.5 * (1.0 + np.vectorize(math.erf)(values / math.sqrt(2.0)))
    n = len(values)
    ks = max(np.max(np.arange(1, n + 1) / n - normal_cdf), np.max(normal_cdf - np.arange(n) / n))
    assert ks < 0.01, ks  # about 3.6x the 1% critical value 1.63/sqrt(256000)
    coordinates = np.corrcoef(z[:, :8], rowvar=False) - np.eye(8)
    assert np.abs(coordinates).max() < 0.05


def test_seeds_and_indices_give_different_noise() -> None:
    rows = np.concatenate([standard_normal(seed, 0, 50, 16) for seed in (0, 1, 2**32, MAX_SEED)])
    assert len(np.unique(rows, axis=0)) == len(rows)


def reference_truncated(seed: int, index: int, size: int, truncation: float) -> list[float]:
    """Truncation as documented: out-of-bound components, in order, take the next in-bound values
    of the same stream, continuing after the words the untruncated noise used."""
    longer = reference_noise(seed, index, size + size % 2 + 400)  # the stream's values, in order
    z, spare = longer[:size], iter(v for v in longer[size + size % 2 :] if abs(v) <= truncation)
    return [v if abs(v) <= truncation else next(spare) for v in z]


@pytest.mark.parametrize(
    ("seed", "index", "size", "truncation"), [(0, 0, 64, 1.0), (9, 77, 7, 0.5), (MAX_SEED, 3, 64, 2.0)]
)
def test_truncation_is_the_documented_redraw(seed: int, index: int, size: int, truncation: float) -> None:
    expected = np.asarray(reference_truncated(seed, index, size, truncation), dtype=np.float32)
    assert np.array_equal(standard_normal(seed, index, index + 1, size, truncation)[0], expected)


def test_truncated_noise_stays_within_the_bound_and_keeps_the_rest() -> None:
    plain = standard_normal(5, 0, 2000, 64)
    truncated = standard_normal(5, 0, 2000, 64, truncation=1.0)
    inside = np.abs(plain) <= 1.0
    assert np.abs(truncated).max() <= 1.0 and np.array_equal(truncated[inside], plain[inside])
    assert not np.array_equal(truncated[~inside], plain[~inside])
    assert np.array_equal(standard_normal(5, 700, 1300, 64, truncation=1.0), truncated[700:1300])
    assert np.array_equal(standard_normal(5, 0, 50, 64, truncation=1e9), plain[:50])


def test_the_smallest_truncation_redraws_every_component_within_it() -> None:
    floor = standard_normal(5, 0, 100, 64, truncation=MIN_TRUNCATION)
    assert np.abs(floor).max() <= MIN_TRUNCATION and len(np.unique(floor)) > 6000


def test_spans_drawn_together_equal_each_drawn_alone() -> None:
    spans = [
        NoiseSpan(7, 0, 3),
        NoiseSpan(MAX_SEED, 10, 12, 0.5),  # truncated: redraws from the right rows' streams
        NoiseSpan(7, 2, 6, 1.0),
        NoiseSpan(2**63, 0, 1),
    ]
    alone = [standard_normal(span.seed, span.start, span.stop, 64, span.truncation) for span in spans]
    together = standard_normal_spans(spans, 64)
    assert together.dtype == np.float32 and together.shape == (3 + 2 + 4 + 1, 64)
    assert np.array_equal(together, np.concatenate(alone))
    assert np.abs(together[3:5]).max() <= 0.5 and np.abs(together[5:9]).max() <= 1.0

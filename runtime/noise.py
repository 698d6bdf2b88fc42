"""Portable noise: ``z`` for digit ``index`` of ``seed`` is a pure function of (seed, index), defined
in a few lines of 64-bit integer arithmetic so that any language can reproduce it (the browser
module in ``web/digitgen.js`` does).

Scheme ``splitmix64-boxmuller-v1``, all integer arithmetic modulo 2**64:

- ``mix(x)``: the SplitMix64 finalizer: ``x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27;
  x *= 0x94D049BB133111EB; x ^= x >> 31``; ``G = 0x9E3779B97F4A7C15``.
- key of a digit: ``k = mix(mix(seed + G) ^ (index * G))``;
- its ``c``-th 64-bit word (``c = 0, 1, ...``): ``w_c = mix(k + (c + 1) * G)``;
- uniform in (0, 1): ``u_c = ((w_c >> 11) + 0.5) / 2**53``;
- Box-Muller in float64 on each pair: ``r = sqrt(-2 ln u_2p)``, ``t = 2 pi u_2p+1``, then
  ``z[2p] = r cos t`` and ``z[2p+1] = r sin t`` (the last sine is dropped for an odd size),
  rounded to float32.
- truncation T (optional): each component with ``|z[j]| > T`` (in float64), in increasing ``j``,
  is replaced by the next Box-Muller value within ``[-T, T]`` of the same digit's stream, taken
  in order (cosine, then sine) from word pairs ``ceil(size / 2)`` onwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

NOISE_SCHEME = "splitmix64-boxmuller-v1"
MAX_SEED = 2**64 - 1
# the smallest truncation accepted: the redraw takes about 1 / (0.8 T) values per component, 12 at 0.1
# (a few seconds for 10,000 digits), and without a floor a tiny T would keep a process busy for hours
MIN_TRUNCATION = 0.1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_REDRAW_PAIRS = 32  # words are drawn in chunks; the values used do not depend on it


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on uint64 (wrapping multiplication)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _normals(keys: np.ndarray, first_pair: int, pairs: int) -> np.ndarray:
    """Box-Muller values (float64) of word pairs ``first_pair .. first_pair+pairs-1`` of each key, in stream order."""
    with np.errstate(over="ignore"):
        counters = np.arange(2 * first_pair + 1, 2 * (first_pair + pairs) + 1, dtype=np.uint64) * _GOLDEN
        words = _mix(keys[:, None] + counters[None, :])
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(uniform[:, 0::2]))
    angle = 2.0 * np.pi * uniform[:, 1::2]
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1).reshape(len(keys), -1)


def _redraw_beyond(z: np.ndarray, keys: np.ndarray, truncation: float, first_pair: int) -> None:
    """Replace, in coordinate order, every ``|z| > truncation`` by the next values of the digit's
    stream (word pairs from ``first_pair`` on) that lie within the bound."""
    for row in np.flatnonzero((np.abs(z) > truncation).any(axis=1)):
        wanted = np.flatnonzero(np.abs(z[row]) > truncation)
        found: list[float] = []
        pair = first_pair
        while len(found) < len(wanted):
            values = _normals(keys[row : row + 1], pair, _REDRAW_PAIRS)[0]
            found += values[np.abs(values) <= truncation].tolist()
            pair += _REDRAW_PAIRS
        z[row, wanted] = found[: len(wanted)]


def standard_normal(seed: int, start: int, stop: int, size: int, truncation: float | None = None) -> np.ndarray:
    """``z`` of shape (stop - start, size), float32, for the digits ``start .. stop-1`` of ``seed``.

    With ``truncation`` T (the truncation trick of BigGAN), each component beyond +-T is redrawn
    from the digit's own stream, so the result is still a pure function of (seed, index).
    """
    return standard_normal_spans([NoiseSpan(seed, start, stop, truncation)], size)


class NoiseSpan(NamedTuple):
    """Digits ``start .. stop-1`` of ``seed``, with an optional truncation."""

    seed: int
    start: int
    stop: int
    truncation: float | None = None


def standard_normal_spans(spans: Sequence[NoiseSpan], size: int) -> np.ndarray:
    """The rows of :func:`standard_normal` for each span, concatenated, drawn in one vectorised pass
    (many small requests cost about as much as one)."""
    counts = [span.stop - span.start for span in spans]
    with np.errstate(over="ignore"):
        streams = _mix(np.array([span.seed for span in spans], dtype=np.uint64) + _GOLDEN)
        indices = np.concatenate([np.arange(span.start, span.stop, dtype=np.uint64) for span in spans])
        keys = _mix(np.repeat(streams, counts) ^ (indices * _GOLDEN))
    pairs = (size + 1) // 2
    z = _normals(keys, 0, pairs)[:, :size]
    first = 0
    for span, count in zip(spans, counts, strict=True):
        if span.truncation is not None:
            rows = slice(first, first + count)
            _redraw_beyond(z[rows], keys[rows], span.truncation, first_pair=pairs)
        first += count
    return z.astype(np.float32)

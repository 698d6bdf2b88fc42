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
"""

from __future__ import annotations

import numpy as np

NOISE_SCHEME = "splitmix64-boxmuller-v1"
MAX_SEED = 2**64 - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on uint64 (wrapping multiplication)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def standard_normal(seed: int, start: int, stop: int, size: int) -> np.ndarray:
    """``z`` of shape (stop - start, size), float32, for the digits ``start .. stop-1`` of ``seed``."""
    with np.errstate(over="ignore"):
        stream = _mix(np.array([seed], dtype=np.uint64) + _GOLDEN)
        keys = _mix(stream ^ (np.arange(start, stop, dtype=np.uint64) * _GOLDEN))
        counters = np.arange(1, 2 * ((size + 1) // 2) + 1, dtype=np.uint64) * _GOLDEN
        words = _mix(keys[:, None] + counters[None, :])
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(uniform[:, 0::2]))
    angle = 2.0 * np.pi * uniform[:, 1::2]
    pairs = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)
    return pairs.reshape(len(keys), -1)[:, :size].astype(np.float32)

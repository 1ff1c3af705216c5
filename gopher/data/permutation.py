"""The order an epoch visits a source's windows: a seeded pseudo-random permutation.

The mixer (gopher/data/mixture.py) needs window `k` of epoch `e` of source `s` without
materialising a shuffled index of every window: its stream must be a pure function of
(seed, step, row), read at random, on any host. A Feistel network keyed by (seed, s, e)
gives that, a bijection of [0, W_s) computed per index in O(1) memory, for any W_s
(cycle walking). It is a concern of its own because it is pure integer arithmetic with
its own invariant (a bijection), tested on its own.

Shapes:
    n: the permutation's size (W_s, the windows in a source's training stream)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that scrambles every bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def feistel_permutation(
    index: np.ndarray, n: int, key: Sequence[int], rounds: int = 4
) -> np.ndarray:
    """A pseudo-random bijection of [0, n) applied to `index` (values in [0, n)).

    A balanced Feistel network over the smallest even number of bits covering n is a
    bijection of [0, 2^bits); values that land outside [0, n) are encrypted again
    ("cycle walking") until they fall inside, which keeps it a bijection of [0, n).
    """
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(index)
    bits = max(2, int(n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.default_rng(list(key)).integers(0, 2**63, size=rounds, dtype=np.uint64)

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            with np.errstate(over="ignore"):
                left, right = right, left ^ (_mix64(right + k) & mask)
        return (left << half) | right

    out = encrypt(index)
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = encrypt(out[outside])
        outside = out >= np.uint64(n)
    return out

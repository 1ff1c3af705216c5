"""Stable 64-bit hashes of words and word n-grams: the same in every process and run, so
repetition measures, deduplication and work grouping agree across hosts.

Shapes: m words, n an n-gram length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_WORD_HASH_CACHE: dict[str, int] = {}  # words recur across documents; bounded below


def _word_hash(word: str) -> int:
    digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def word_hashes(words: Sequence[str]) -> np.ndarray:
    """[m] uint64: a stable 64-bit hash of each word (the same in every process)."""
    if len(_WORD_HASH_CACHE) > 4_000_000:
        _WORD_HASH_CACHE.clear()
    cache = _WORD_HASH_CACHE
    unique = dict.fromkeys(words)  # first-seen order
    for w in unique:
        if w not in cache:
            cache[w] = _word_hash(w)
    table = np.fromiter(map(cache.__getitem__, unique), dtype=np.uint64, count=len(unique))
    index = {w: i for i, w in enumerate(unique)}
    ids = np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=len(words))
    return table[ids]


_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: n-gram hashes stay well mixed


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """[m - n + 1] uint64 hashes of the word n-grams, given [m] word hashes."""
    out = hashes[: len(hashes) - n + 1].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            out = out * _NGRAM_MULTIPLIER + hashes[k : len(hashes) - n + 1 + k]
    return out

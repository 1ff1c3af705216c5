"""Near-duplicate documents: MinHash-LSH over word n-grams, checked by exact Jaccard.

The pipeline (gopher/data/filters.py) deduplicates all sources together in a fixed order
(the first document wins): exact duplicates by SHA-256 of the text, then near duplicates
here, by MinHash-LSH on word 13-grams. Two documents are near duplicates when the exact
Jaccard similarity of their 13-gram sets is >= 0.8 (the paper's threshold). LSH with 16
bands x 8 rows (K = 128 hash functions) proposes candidates: a pair at Jaccard 0.8 becomes
a candidate with probability 1 - (1 - 0.8^8)^16 = 0.95, at 0.85 with 0.997; candidates are
then checked exactly, so no pair below the threshold is ever joined. Near duplicates form
clusters (union-find) and each cluster keeps its first document: every removed document has
a near duplicate in its cluster, though not necessarily the kept one (clusters chain: A-B
and B-C at 0.88 with A-C at 0.77 drop both B and C, as connected-component dedup does).

Shapes: K MinHash functions (= bands * rows).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from gopher.data.hashing import ngram_hashes, word_hashes
from gopher.data.unionfind import UnionFind


@dataclasses.dataclass(frozen=True)
class MinHashConfig:
    """MinHash-LSH over word n-grams; see the module docstring for the numbers."""

    ngram: int = 13
    bands: int = 16
    rows: int = 8
    threshold: float = 0.8
    seed: int = 0

    @property
    def num_hashes(self) -> int:
        return self.bands * self.rows


DEFAULT_MINHASH = MinHashConfig()  # the paper's threshold with the numbers above


def shingles(text: str, n: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the word n-grams (the whole text if shorter)."""
    hashes = word_hashes(text.split())
    if len(hashes) == 0:
        return np.zeros([0], np.uint64)
    return np.unique(ngram_hashes(hashes, min(n, len(hashes))))


def minhash_signature(shingle_set: np.ndarray, config: MinHashConfig) -> np.ndarray:
    """[K] uint64 MinHash signature: min over shingles of K random bijections of uint64."""
    rng = np.random.default_rng([config.seed, 0x6D696E68])
    xors = rng.integers(0, 2**63, size=config.num_hashes, dtype=np.uint64) * np.uint64(2)
    muls = rng.integers(0, 2**62, size=config.num_hashes, dtype=np.uint64) * np.uint64(
        2
    ) + np.uint64(1)
    if len(shingle_set) == 0:
        return np.full(config.num_hashes, np.iinfo(np.uint64).max, np.uint64)
    out = np.empty(config.num_hashes, np.uint64)
    chunk = 16
    with np.errstate(over="ignore"):
        for k in range(0, config.num_hashes, chunk):
            # Shingles are already uniform 64-bit hashes: xor-then-odd-multiply is a
            # different bijection of uint64 per k, enough for min-wise sampling.
            mixed = (shingle_set[None, :] ^ xors[k : k + chunk, None]) * muls[k : k + chunk, None]
            out[k : k + chunk] = mixed.min(axis=1)  # [chunk]
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique uint64 arrays."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def near_duplicates(texts: Sequence[str], config: MinHashConfig = DEFAULT_MINHASH) -> list[int]:
    """Indices of the documents to drop: all but the first of each near-duplicate cluster."""
    sets = [shingles(t, config.ngram) for t in texts]
    signatures = np.stack([minhash_signature(s, config) for s in sets]) if sets else None
    clusters = UnionFind(len(texts))  # the earliest document is each cluster's root
    find, union = clusters.find, clusters.union
    checked: set[tuple[int, int]] = set()
    for band in range(config.bands):
        buckets: dict[bytes, list[int]] = collections.defaultdict(list)
        rows = signatures[:, band * config.rows : (band + 1) * config.rows] if len(texts) else []
        for i, key in enumerate(rows):
            buckets[key.tobytes()].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            # All pairs in small buckets; against the first member only in big ones, so
            # a bucket of boilerplate costs linear, not quadratic, time.
            pairs = (
                [(a, b) for k, a in enumerate(members) for b in members[k + 1 :]]
                if len(members) <= 32
                else [(members[0], b) for b in members[1:]]
            )
            for a, b in pairs:
                if (a, b) in checked or find(a) == find(b):
                    continue
                checked.add((a, b))
                if jaccard(sets[a], sets[b]) >= config.threshold:
                    union(a, b)
    return [i for i in range(len(texts)) if find(i) != i]

"""Held-out splits by work: every edition or near-copy of a text on the same side.

Held-out text must measure generalisation, so a split by document name is not enough
when a corpus holds several editions of one text (a play in First Folio and Gutenberg
spelling) or one text inside another (a pydoc topic inside pydoc_data/topics.py). The
stdlib source (gopher/data/sources.py) and the corpus build (gopher/data/build.py) both
split this way; it lives apart from the sources because it is near-duplicate detection
(word n-gram shingles, an inverted index, union-find), not reading text.

Two documents are one work when
- their word 13-gram Jaccard is >= `WorkGrouping.jaccard` (0.08), with words lowercased,
  stripped of punctuation and folded for early-modern spelling (u/v, i/j/y, doubled
  letters, a final e): the embedded corpus's 36 Shakespeare plays in First Folio and
  Gutenberg spelling measure 0.106-0.193 folded (0.0005-0.0019 raw), the best
  non-matching play 0.0026; unrelated dictionary chunks reach 0.031 and unrelated
  stdlib modules ~0.05 (gopher/data/dedup.py drops pairs at 0.8); or
- one holds most of the other: containment |A & B| / min(|A|, |B|) >= 0.5 over the same
  13-gram sets (a pydoc topic inside pydoc_data/topics.py, a speech inside a longer one),
  which the Jaccard misses when the sizes differ; or
- their names share a title key (`work_key`: a Gutenberg edition tag `_gut`/`_gut_f`
  dropped).
Candidate pairs come from an inverted index of the 13-gram hashes (13-grams shared by
more than `max_bucket` documents are boilerplate and propose no pairs), groups from
union-find. Held-out groups are then filled greedily, in the order of a hash of each
group's canonical (smallest) name, taking a group when that brings each source's
held-out bytes closer to `heldout_fraction` of its total: a per-group hash meets the
fraction only in expectation, and a few big groups (topics.py and its ~80 topics)
swing it far off.
The split is a pure function of the documents' names and texts (not of their order).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from gopher.data.hashing import ngram_hashes, word_hashes
from gopher.data.unionfind import UnionFind

if TYPE_CHECKING:  # sources imports this module for its stdlib split
    from gopher.data.sources import Document


@dataclasses.dataclass(frozen=True)
class WorkGrouping:
    """When two documents are one work; see the module docstring for the numbers."""

    ngram: int = 13
    jaccard: float = 0.08
    containment: float = 0.5
    max_bucket: int = 64  # a 13-gram in more documents than this proposes no pairs


_WORD_RE = re.compile(r"[^\W_]+")
_ESCAPE_RE = re.compile(r"\\[nrt]")  # "\n" inside string literals (pydoc_data/topics.py)
_DOUBLED_RE = re.compile(r"([^\W\d_])\1+")
_FINAL_E_RE = re.compile(r"(?<=[^\W\d_]{3})e\b")
_SPELLING = str.maketrans({"u": "v", "j": "i", "y": "i"})
_EDITION_TAG_RE = re.compile(r"_gut(_f)?$")


def work_words(text: str) -> list[str]:
    """The words the grouping compares: lowercase letters and digits, spelling folded
    (u->v, j->i, y->i, doubled letters single, a final e dropped: "haue" = "have"), with
    string-literal escapes as spaces (a text quoted in code reads as the text)."""
    text = _ESCAPE_RE.sub(" ", text.lower()).translate(_SPELLING)
    folded = _FINAL_E_RE.sub("", _DOUBLED_RE.sub(r"\1", text))
    return _WORD_RE.findall(folded)


def work_shingles(text: str, n: int = 13):
    """[k] uint64: sorted unique hashes of the folded word n-grams (the text if shorter)."""
    hashes = word_hashes(work_words(text))
    if len(hashes) == 0:
        return np.zeros([0], np.uint64)
    return np.unique(ngram_hashes(hashes, min(n, len(hashes))))


def work_key(name: str) -> str:
    """A title key from the name: the path without extension or Gutenberg edition tag
    ("texts/hamlet_gut_f.txt" and "texts/hamlet_gut.txt" are "texts/hamlet")."""
    stem, _ = os.path.splitext(name)
    return _EDITION_TAG_RE.sub("", stem)


def _full_name(doc: Document) -> str:
    return f"{doc.source}/{doc.name}"


def group_works(docs: Sequence[Document], config: WorkGrouping = WorkGrouping()) -> list[int]:
    """[len(docs)]: for each document, the index of its work's first member."""
    works = UnionFind(len(docs))  # a work's first document is its root
    find, union = works.find, works.union
    first_with_key: dict[str, int] = {}
    for i, d in enumerate(docs):
        union(first_with_key.setdefault(work_key(_full_name(d)), i), i)
    sets = [work_shingles(d.text, config.ngram) for d in docs]
    if sets and sum(map(len, sets)):
        grams = np.concatenate(sets)  # [G] every document's n-grams, then sorted
        owner = np.concatenate([np.full(len(x), i, np.int64) for i, x in enumerate(sets)])
        order = np.argsort(grams, kind="stable")
        grams, owner = grams[order], owner[order]
        starts = np.flatnonzero(np.r_[True, grams[1:] != grams[:-1]])
        sizes = np.diff(np.r_[starts, len(grams)])
        shared = (sizes > 1) & (sizes <= config.max_bucket)
        candidates: set[tuple[int, int]] = set()
        for start, size in zip(starts[shared].tolist(), sizes[shared].tolist(), strict=True):
            members = owner[start : start + size].tolist()
            candidates.update(
                (a, b) for k, a in enumerate(members) for b in members[k + 1 :] if a != b
            )
        for a, b in sorted(candidates):
            if find(a) == find(b):
                continue
            inter = len(np.intersect1d(sets[a], sets[b], assume_unique=True))
            smaller = min(len(sets[a]), len(sets[b]))
            if (
                inter >= config.jaccard * (len(sets[a]) + len(sets[b]) - inter)
                or inter >= config.containment * smaller
            ):
                union(a, b)
    return [find(i) for i in range(len(docs))]


def split_by_work(
    docs: Sequence[Document],
    heldout_fraction: float,
    config: WorkGrouping = WorkGrouping(),
) -> tuple[list[Document], list[Document]]:
    """(train, heldout), each in the given order, with every work on one side and each
    source's (`Document.source`) held-out bytes near `heldout_fraction` of its total.

    Works may span sources (pydoc topics, technical; topics.py, code): the greedy fill
    takes a work when that brings every source it touches nearer its target. A source
    with two works or more and none taken gets its smallest work held out, so a small
    source still has text to score.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction {heldout_fraction!r} is not in [0, 1); use e.g. 0.02")
    roots = group_works(docs, config)
    size: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    canonical: dict[int, str] = {}
    for d, r in zip(docs, roots, strict=True):
        size[r][d.source] += len(d.text.encode("utf-8", "surrogatepass"))
        canonical[r] = min(canonical.get(r, _full_name(d)), _full_name(d))
    order = sorted(size, key=lambda r: hashlib.sha256(canonical[r].encode()).digest())
    totals: collections.Counter = sum(size.values(), collections.Counter())
    target = {s: heldout_fraction * n for s, n in totals.items()}
    held: set[int] = set()
    taken: collections.Counter = collections.Counter()
    for r in order:  # take it if every source it touches lands nearer its target
        if all(taken[s] + n / 2 < target[s] for s, n in size[r].items()):
            held.add(r)
            taken.update(size[r])
    for s in sorted(totals):
        works = [r for r in order if s in size[r]]
        if heldout_fraction > 0 and not taken[s] and len(works) >= 2:
            smallest = min(works, key=lambda r: sum(size[r].values()))
            held.add(smallest)
            taken.update(size[smallest])
    heldout = [d for d, r in zip(docs, roots, strict=True) if r in held]
    train = [d for d, r in zip(docs, roots, strict=True) if r not in held]
    return train, heldout

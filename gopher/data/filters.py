"""MassiveText's quality filter and repetition removal, and the pipeline that applies them
and the deduplication of gopher/data/dedup.py.

Shapes: m is the number of words in a document, n an n-gram length.

Rules and thresholds are Gopher's (Rae et al. 2021, App. A.1.1), applied in
the paper's order; a document is attributed to the first rule it fails, so each removed
document is counted once. Definitions where the paper leaves a choice:

- A *word* is a maximal run of non-whitespace characters (`str.split()`); its length is
  its character count. "Characters" in every fraction are the characters of words
  (whitespace excluded), except for lines and paragraphs, whose characters are their
  own (stripped) characters.
- Bullet and ellipsis lines are counted over non-empty lines; a bullet line starts
  (after indentation) with one of `BULLETS`, an ellipsis line ends with "..." or "…".
- The symbol-to-word ratios are `count("#") / words` and
  `(count("...") + count("…")) / words`, each compared with 0.1 on its own.
- The stop-word rule needs at least two *different* words of
  {the, be, to, of, and, that, have, with} (case-insensitive, whole words), the paper's
  literal reading ("at least two of the following English words").
- Duplicate lines (paragraphs: blocks separated by blank lines) are the occurrences of
  a line after its first; the fraction is over all non-empty lines.
- Top n-gram character fraction (n = 2, 3, 4): characters of the words covered by the
  occurrences of the most frequent n-gram (if it occurs at least twice; ties go to the
  n-gram covering most characters), each word counted once even where occurrences
  overlap. Duplicate n-gram character fraction (n = 5..10): characters of the words
  covered by the repeats of n-grams (every occurrence after an n-gram's first), each
  word counted once ("taking care not to count characters in overlapping n-grams
  twice"); as for lines and paragraphs, an n-gram's first occurrence is not a repeat.
- Code sources skip the quality and repetition rules (as MassiveText's GitHub subset)
  and go through deduplication only.

Deduplication (gopher/data/dedup.py) runs over all sources together in a fixed order (the
first document wins): exact duplicates by SHA-256 of the text, then near duplicates by
MinHash-LSH on word 13-grams.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Sequence

import numpy as np

from gopher.data.dedup import DEFAULT_MINHASH, MinHashConfig, near_duplicates
from gopher.data.hashing import ngram_hashes, word_hashes
from gopher.data.sources import Document

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "‣", "●", "◦", "▪", "▸", "►", "-", "*", "–", "—", "·")
ELLIPSES = ("...", "…")
_STOP_WORD_RE = re.compile(r"\b(" + "|".join(STOP_WORDS) + r")\b", re.IGNORECASE)
_ALPHA_WORD_RE = re.compile(r"(?<!\S)\S*?[^\W\d_]\S*")  # a word with a letter in it
_PARAGRAPH_SPLIT_RE = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclasses.dataclass(frozen=True)
class QualityThresholds:
    """Gopher's quality filter (Rae et al. 2021, App. A.1.1)."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_line_fraction: float = 0.9
    max_ellipsis_line_fraction: float = 0.3
    min_alpha_word_fraction: float = 0.8
    min_stop_words: int = 2


@dataclasses.dataclass(frozen=True)
class RepetitionThresholds:
    """Gopher's repetition removal (Rae et al. 2021, App. A.1.1)."""

    max_dup_line_fraction: float = 0.30
    max_dup_paragraph_fraction: float = 0.30
    max_dup_line_char_fraction: float = 0.20
    max_dup_paragraph_char_fraction: float = 0.20
    max_top_ngram_char_fraction: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    # 5..10-grams: 0.15 down to 0.10 in steps of 0.01.
    max_dup_ngram_char_fraction: tuple[tuple[int, float], ...] = (
        (5, 0.15),
        (6, 0.14),
        (7, 0.13),
        (8, 0.12),
        (9, 0.11),
        (10, 0.10),
    )


QUALITY_RULES = (
    "word_count",
    "mean_word_length",
    "hash_word_ratio",
    "ellipsis_word_ratio",
    "bullet_lines",
    "ellipsis_lines",
    "alpha_words",
    "stop_words",
)
REPETITION_RULES = (
    "dup_line_fraction",
    "dup_paragraph_fraction",
    "dup_line_char_fraction",
    "dup_paragraph_char_fraction",
    *(f"top_{n}gram_char_fraction" for n in (2, 3, 4)),
    *(f"dup_{n}gram_char_fraction" for n in range(5, 11)),
)
DEDUP_RULES = ("exact_duplicate", "near_duplicate")
TEST_SET_RULES = ("test_overlap",)  # gopher.data.decontaminate, applied after these
ALL_RULES = QUALITY_RULES + REPETITION_RULES + DEDUP_RULES + TEST_SET_RULES


def _lines(text: str) -> list[str]:
    return [line for line in (raw.strip() for raw in text.splitlines()) if line]


def quality_measures(text: str) -> dict[str, float]:
    """The quantities the quality rules threshold (ratios are over words or lines)."""
    words = text.split()
    num_words = len(words)
    lines = _lines(text)
    found: set[str] = set()
    for match in _STOP_WORD_RE.finditer(text):
        found.add(match.group(1).lower())
    per_word = max(1, num_words)
    per_line = max(1, len(lines))
    return {
        "words": num_words,
        "mean_word_length": sum(map(len, words)) / per_word,
        "hash_word_ratio": text.count("#") / per_word,
        "ellipsis_word_ratio": sum(text.count(e) for e in ELLIPSES) / per_word,
        "bullet_line_fraction": sum(line.startswith(BULLETS) for line in lines) / per_line,
        "ellipsis_line_fraction": sum(line.endswith(ELLIPSES) for line in lines) / per_line,
        "alpha_word_fraction": len(_ALPHA_WORD_RE.findall(text)) / per_word,
        "stop_words": len(found),
    }


def quality_violations(text: str, t: QualityThresholds = QualityThresholds()) -> list[str]:
    """The quality rules `text` fails, in the paper's order."""
    m = quality_measures(text)
    if m["words"] == 0:
        return ["word_count"]  # every other rule is a ratio over words
    checks = (
        ("word_count", not t.min_words <= m["words"] <= t.max_words),
        (
            "mean_word_length",
            not t.min_mean_word_length <= m["mean_word_length"] <= t.max_mean_word_length,
        ),
        ("hash_word_ratio", m["hash_word_ratio"] > t.max_symbol_word_ratio),
        ("ellipsis_word_ratio", m["ellipsis_word_ratio"] > t.max_symbol_word_ratio),
        ("bullet_lines", m["bullet_line_fraction"] > t.max_bullet_line_fraction),
        ("ellipsis_lines", m["ellipsis_line_fraction"] > t.max_ellipsis_line_fraction),
        ("alpha_words", m["alpha_word_fraction"] < t.min_alpha_word_fraction),
        ("stop_words", m["stop_words"] < t.min_stop_words),
    )
    return [rule for rule, failed in checks if failed]


def _duplicate_fractions(items: Sequence[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    total_chars = sum(map(len, items))
    return dup_items / max(1, len(items)), dup_chars / max(1, total_chars)


def _covered_chars(starts: np.ndarray, n: int, lengths: np.ndarray) -> int:
    """Characters of the words covered by n-grams starting at `starts`, each word once."""
    if len(starts) == 0:
        return 0
    delta = np.zeros(len(lengths) + 1, np.int64)
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + n, -1)
    covered = np.cumsum(delta[:-1]) > 0  # [m]
    return int(lengths[covered].sum())


def repetition_measures(text: str) -> dict[str, float]:
    """The fractions the repetition rules threshold (see the module docstring)."""
    lines = _lines(text)
    paragraphs = [p for p in (raw.strip() for raw in _PARAGRAPH_SPLIT_RE.split(text)) if p]
    out: dict[str, float] = {}
    out["dup_line_fraction"], out["dup_line_char_fraction"] = _duplicate_fractions(lines)
    out["dup_paragraph_fraction"], out["dup_paragraph_char_fraction"] = _duplicate_fractions(
        paragraphs
    )
    words = text.split()
    hashes = word_hashes(words)  # [m]
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))  # [m]
    total = max(1, int(lengths.sum()))
    cumulative = np.concatenate([[0], np.cumsum(lengths)])  # [m + 1]
    for n in (2, 3, 4):
        out[f"top_{n}gram_char_fraction"] = 0.0
        if len(words) < n:
            continue
        grams = ngram_hashes(hashes, n)  # [m - n + 1]
        _, first, inverse, counts = np.unique(
            grams, return_index=True, return_inverse=True, return_counts=True
        )
        top = counts.max()
        if top < 2:
            continue
        # Among the most frequent n-grams, the one with the most characters.
        tied = np.flatnonzero(counts == top)
        gram_chars = cumulative[first[tied] + n] - cumulative[first[tied]]
        best = tied[np.argmax(gram_chars)]
        starts = np.flatnonzero(inverse == best)
        out[f"top_{n}gram_char_fraction"] = _covered_chars(starts, n, lengths) / total
    for n in range(5, 11):
        out[f"dup_{n}gram_char_fraction"] = 0.0
        if len(words) < n:
            continue
        grams = ngram_hashes(hashes, n)
        _, first, inverse = np.unique(grams, return_index=True, return_inverse=True)
        starts = np.flatnonzero(first[inverse] != np.arange(len(grams)))  # repeats only
        out[f"dup_{n}gram_char_fraction"] = _covered_chars(starts, n, lengths) / total
    return out


def repetition_violations(text: str, t: RepetitionThresholds = RepetitionThresholds()) -> list[str]:
    """The repetition rules `text` fails, in the paper's order."""
    m = repetition_measures(text)
    limits = {
        "dup_line_fraction": t.max_dup_line_fraction,
        "dup_paragraph_fraction": t.max_dup_paragraph_fraction,
        "dup_line_char_fraction": t.max_dup_line_char_fraction,
        "dup_paragraph_char_fraction": t.max_dup_paragraph_char_fraction,
        **{f"top_{n}gram_char_fraction": v for n, v in t.max_top_ngram_char_fraction},
        **{f"dup_{n}gram_char_fraction": v for n, v in t.max_dup_ngram_char_fraction},
    }
    return [rule for rule in REPETITION_RULES if rule in limits and m[rule] > limits[rule]]


def first_violation(
    text: str,
    quality: QualityThresholds | None = QualityThresholds(),
    repetition: RepetitionThresholds | None = RepetitionThresholds(),
) -> str | None:
    """The first rule `text` fails (quality rules, then repetition), or None.

    `None` for either set of thresholds skips it (code sources skip both).
    """
    if quality is not None:
        failed = quality_violations(text, quality)
        if failed:
            return failed[0]
    if repetition is not None:
        failed = repetition_violations(text, repetition)
        if failed:
            return failed[0]
    return None


def violations(
    text: str,
    quality: QualityThresholds = QualityThresholds(),
    repetition: RepetitionThresholds = RepetitionThresholds(),
) -> list[str]:
    """Every quality and repetition rule `text` fails, in order (for tests and reports)."""
    return [*quality_violations(text, quality), *repetition_violations(text, repetition)]


# --- the whole pipeline ---------------------------------------------------------------


def empty_report(sources: Iterable[str]) -> dict[str, dict[str, int]]:
    return {s: {"input": 0, **dict.fromkeys(ALL_RULES, 0), "kept": 0} for s in sources}


def filter_documents(
    documents: Sequence[Document],
    code_sources: Iterable[str] = (),
    quality: QualityThresholds = QualityThresholds(),
    repetition: RepetitionThresholds = RepetitionThresholds(),
    minhash: MinHashConfig | None = DEFAULT_MINHASH,
) -> tuple[list[Document], dict[str, dict[str, int]]]:
    """Quality, repetition, exact and near-duplicate filtering; (kept, report per source).

    `documents` are processed in their given order, which decides which copy of a
    duplicate is kept; the kept documents come back in that order. The report counts,
    per source, the input documents, the documents each rule removed (the first rule
    a document fails), and the documents kept.
    """
    code = frozenset(code_sources)
    report = empty_report(sorted({d.source for d in documents}))
    survivors: list[Document] = []
    for doc in documents:
        report[doc.source]["input"] += 1
        reason = None
        if doc.source not in code:
            reason = first_violation(doc.text, quality, repetition)
        if reason:
            report[doc.source][reason] += 1
        else:
            survivors.append(doc)

    unique: list[Document] = []
    seen: set[bytes] = set()
    for doc in survivors:
        digest = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).digest()
        if digest in seen:
            report[doc.source]["exact_duplicate"] += 1
        else:
            seen.add(digest)
            unique.append(doc)

    drop: set[int] = set()
    if minhash is not None:
        drop = set(near_duplicates([d.text for d in unique], minhash))
    kept = []
    for i, doc in enumerate(unique):
        if i in drop:
            report[doc.source]["near_duplicate"] += 1
        else:
            kept.append(doc)
            report[doc.source]["kept"] += 1
    return kept, report


def format_report(report: dict[str, dict[str, int]]) -> str:
    """A table of documents removed per rule (rows) and source (columns); zero rows omitted."""
    sources = sorted(report)
    width = max([12, *map(len, sources)])
    lines = ["rule".ljust(30) + "".join(s.rjust(width + 1) for s in sources)]
    for rule in ("input", *ALL_RULES, "kept"):
        counts = [report[s].get(rule, 0) for s in sources]
        if rule in ("input", "kept") or any(counts):
            lines.append(rule.ljust(30) + "".join(str(c).rjust(width + 1) for c in counts))
    return "\n".join(lines)

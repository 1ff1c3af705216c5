"""Tests for gopher.data.filters: each rule on a document made to break it and nothing else."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from gopher.data import dedup, filters
from gopher.data.sources import Document

CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def pseudo_word(i: int, syllables: int = 3) -> str:
    """The i-th consonant-vowel word of `syllables` syllables (90 ** syllables of them)."""
    out = ""
    for _ in range(syllables):
        i, r = divmod(i, 90)
        out += CONSONANTS[r // 5] + VOWELS[r % 5]
    return out


class Words:
    """Never-repeating words, so every n-gram (n >= 2) made from them is unique."""

    def __init__(self, syllables: int = 3, start: int = 0):
        self.next, self.syllables = start, syllables

    def take(self, n: int) -> list[str]:
        out = [pseudo_word(self.next + k, self.syllables) for k in range(n)]
        self.next += n
        return out


def line(w: Words, fmt: str = "{}") -> str:
    """Ten words: eight new ones with "the" and "and" among them (two stop words)."""
    ws = w.take(8)
    return fmt.format(" ".join([*ws[:2], "the", *ws[2:5], "and", *ws[5:]]))


def prose(w: Words, lines: int = 20) -> str:
    return "\n".join(line(w) for _ in range(lines)) + "\n"


def test_thresholds_are_gophers():
    q, r = filters.QualityThresholds(), filters.RepetitionThresholds()
    assert (q.min_words, q.max_words) == (50, 100_000)
    assert (q.min_mean_word_length, q.max_mean_word_length) == (3, 10)
    assert q.max_symbol_word_ratio == 0.1
    assert (q.max_bullet_line_fraction, q.max_ellipsis_line_fraction) == (0.9, 0.3)
    assert (q.min_alpha_word_fraction, q.min_stop_words) == (0.8, 2)
    assert (r.max_dup_line_fraction, r.max_dup_paragraph_fraction) == (0.30, 0.30)
    assert (r.max_dup_line_char_fraction, r.max_dup_paragraph_char_fraction) == (0.20, 0.20)
    assert r.max_top_ngram_char_fraction == ((2, 0.20), (3, 0.18), (4, 0.16))
    assert [n for n, _ in r.max_dup_ngram_char_fraction] == list(range(5, 11))
    np.testing.assert_allclose(
        [v for _, v in r.max_dup_ngram_char_fraction], [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    )
    assert set(filters.STOP_WORDS) == {"the", "be", "to", "of", "and", "that", "have", "with"}


def quality_cases() -> dict[str, str]:
    w = Words()
    rng = np.random.default_rng(0)
    two_letter = [pseudo_word(i, 1) for i in range(90)]
    return {
        "word_count": prose(w, lines=4),  # 40 words
        "word_count/long": prose(w, lines=10_001),  # 100,010 words
        # Two-letter words (plus "to" and "of", so the stop-word rule holds).
        "mean_word_length": "to of "
        + "\n".join(" ".join(rng.choice(two_letter, 10)) for _ in range(20))
        + "\n",
        "mean_word_length/long": prose(Words(syllables=6)),  # 12-letter words
        "hash_word_ratio": "\n".join(line(w).replace(" ", " #", 2) for _ in range(20)) + "\n",
        "ellipsis_word_ratio": "\n".join(line(w).replace(" ", "... ", 2) for _ in range(20)) + "\n",
        "bullet_lines": "\n".join(line(w, "• {}") for _ in range(20)) + "\n",
        "ellipsis_lines": "\n".join(line(w, "{}…" if k % 2 else "{}") for k in range(20)) + "\n",
        "alpha_words": "\n".join(
            line(w) + f" {3 * k:04d} {3 * k + 1:04d} {3 * k + 2:04d}" for k in range(20)
        )
        + "\n",
        # "the" many times is one stop word; the rule needs two different ones.
        "stop_words": prose(w).replace(" and ", " the "),
    }


def repetition_cases() -> dict[str, str]:
    w = Words()
    out = {}
    # 21 copies of a short line among 40 unique lines: 20 of 61 lines repeat.
    lines = []
    for k in range(40):
        lines += [line(w)] + (["Indeed."] if k < 21 else [])
    out["dup_line_fraction"] = "\n".join(lines) + "\n"
    # 6 one-word paragraphs among 10 unique 4-line paragraphs: 5 of 16 paragraphs repeat.
    paragraphs = []
    for k in range(10):
        paragraphs += ["\n".join(line(w) for _ in range(4))] + (["Indeed."] if k < 6 else [])
    out["dup_paragraph_fraction"] = "\n\n".join(paragraphs) + "\n"
    # 10 distinct 4-word lines of long words, each twice (10 of 45 lines, 21% of chars);
    # 4 words, so no 5-gram repeats.
    long_words = Words(syllables=7, start=10**6)
    repeated = [" ".join(long_words.take(4)) for _ in range(10)]
    lines = [x for r in repeated for x in (r, line(w))] + [line(w) for _ in range(5)]
    lines += [x for r in repeated for x in (r, line(w))]
    out["dup_line_char_fraction"] = "\n".join(lines) + "\n"
    # A paragraph's characters include its inner whitespace, a stripped line's do not:
    # a 4-word paragraph indented inside by 450 spaces, twice, is 21% of the paragraph
    # characters but 2% of the line characters.
    a, b, c, d = w.take(4)
    twice = f"{a} {b}\n{' ' * 450}{c} {d}"
    paragraphs = [line(w) for _ in range(10)] + [twice] + [line(w) for _ in range(10)] + [twice]
    out["dup_paragraph_char_fraction"] = "\n\n".join(paragraphs) + "\n"
    # The most frequent n-gram covers 31% (2-gram), 25% (3-gram), 18% (4-gram) of the
    # characters, and its sub-n-grams stay under their own (higher) limits.
    a, b = w.take(2)
    out["top_2gram_char_fraction"] = (
        "\n".join(line(w).replace(" ", f" {a} {b} ", 1) + f" {a} {b}" for _ in range(20)) + "\n"
    )
    a, b, c = w.take(3)
    gram = f" {a} {b} {c} "
    out["top_3gram_char_fraction"] = "\n".join(line(w).replace(" ", gram, 1) for _ in range(20))
    a, b, c, d = w.take(4)
    gram = f" {a} {b} {c} {d} "
    out["top_4gram_char_fraction"] = "\n".join(
        line(w).replace(" ", gram, 1) if k % 2 else line(w) for k in range(20)
    )
    # m distinct runs of n new words, each twice: the repeats cover the same characters
    # for every k <= n and none for k > n, so a coverage between the n-gram limit and
    # the (n-1)-gram limit breaks exactly the n-gram rule. All words have 6 letters
    # but "the" and "and": a line has 54 word characters.
    limits = dict(filters.RepetitionThresholds().max_dup_ngram_char_fraction)
    for n, limit in limits.items():
        m, coverage = 10, limit + 0.005
        num_lines = round((m * 6 * n / coverage - 2 * m * 6 * n) / 54)
        assert num_lines >= 2 * m
        runs = [" ".join(w.take(n)) for _ in range(m)]
        lines = [line(w) for _ in range(num_lines)]
        for k, run in enumerate(runs + runs):
            lines[k] = lines[k].replace(" ", f" {run} ", 1)
        out[f"dup_{n}gram_char_fraction"] = "\n".join(lines) + "\n"
    return out


def test_a_plain_document_passes_every_rule():
    text = prose(Words())
    assert filters.violations(text) == []
    assert filters.first_violation(text) is None


@pytest.mark.parametrize("case", sorted(quality_cases()))
def test_each_quality_rule_alone(case):
    rule = case.split("/")[0]
    assert filters.violations(quality_cases()[case]) == [rule]


_REPETITION = repetition_cases()


@pytest.mark.parametrize("rule", sorted(_REPETITION))
def test_each_repetition_rule_alone(rule):
    assert filters.violations(_REPETITION[rule]) == [rule]
    assert filters.first_violation(_REPETITION[rule]) == rule


def test_boundaries_are_inclusive():
    w = Words()
    fifty = " ".join(line(w) for _ in range(5))
    assert filters.quality_violations(fifty) == []
    assert filters.quality_violations(fifty.rsplit(" ", 1)[0]) == ["word_count"]
    # 3 of 10 non-empty lines end with an ellipsis: exactly the limit, kept; 4 is over.
    lines = [line(w) for _ in range(10)]
    at_limit = [x + "…" if k < 3 else x for k, x in enumerate(lines)]
    assert filters.quality_violations("\n\n".join(at_limit)) == []
    over = [x + "…" if k < 4 else x for k, x in enumerate(lines)]
    assert filters.quality_violations("\n".join(over)) == ["ellipsis_lines"]


def test_stop_words_are_whole_words_any_case():
    w = Words()
    body = " ".join(w.take(60))
    assert filters.quality_violations(f"The {body} OF") == []
    assert filters.quality_violations(f"theory {body} often") == ["stop_words"]
    assert filters.quality_violations(f"with {body} with with") == ["stop_words"]


def naive_repetition(text: str) -> dict[str, float | set[float]]:
    """The repetition fractions, by the definitions in the module docstring, in plain Python."""
    words = text.split()
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    paragraphs = [p.strip() for p in text.replace("\r", "").split("\n\n") if p.strip()]

    def duplicates(items):
        seen, count, chars = set(), 0, 0
        for item in items:
            if item in seen:
                count, chars = count + 1, chars + len(item)
            seen.add(item)
        return count / len(items), chars / sum(map(len, items))

    out: dict[str, float | set[float]] = {}
    out["dup_line_fraction"], out["dup_line_char_fraction"] = duplicates(lines)
    out["dup_paragraph_fraction"], out["dup_paragraph_char_fraction"] = duplicates(paragraphs)
    total = sum(map(len, words))
    for n in (2, 3, 4):
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        counts = collections.Counter(grams)
        top = max(counts.values())
        if top < 2:
            out[f"top_{n}gram_char_fraction"] = 0.0
            continue
        tied = [g for g, c in counts.items() if c == top]
        longest = max(sum(map(len, g)) for g in tied)
        options = set()  # ties of equal length: any of them is a right answer
        for g in (g for g in tied if sum(map(len, g)) == longest):
            covered = {j for i, x in enumerate(grams) if x == g for j in range(i, i + n)}
            options.add(sum(len(words[j]) for j in covered) / total)
        out[f"top_{n}gram_char_fraction"] = options
    for n in range(5, 11):
        seen, covered = set(), set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            if gram in seen:
                covered.update(range(i, i + n))
            seen.add(gram)
        out[f"dup_{n}gram_char_fraction"] = sum(len(words[j]) for j in covered) / total
    return out


@pytest.mark.parametrize("seed", range(12))
def test_repetition_measures_match_a_naive_oracle(seed):
    rng = np.random.default_rng(seed)
    vocab = ["a", "bb", "ccc", "dddd", "the", "of", "x" * 9][: rng.integers(3, 8)]
    parts = []
    for _ in range(int(rng.integers(60, 400))):
        parts.append(str(rng.choice(vocab)))
        parts.append(str(rng.choice([" ", " ", " ", "\n", "\n\n"])))
    text = "".join(parts)
    got = filters.repetition_measures(text)
    for key, expected in naive_repetition(text).items():
        if isinstance(expected, set):
            assert any(got[key] == pytest.approx(e) for e in expected), (key, got[key], expected)
        else:
            assert got[key] == pytest.approx(expected), key


# --- deduplication -----------------------------------------------------------------------


def shingle_jaccard(a: str, b: str, n: int = 13) -> float:
    """The oracle: Jaccard similarity of word 13-gram sets, with Python tuples."""
    sa = {tuple(a.split()[i : i + n]) for i in range(len(a.split()) - n + 1)}
    sb = {tuple(b.split()[i : i + n]) for i in range(len(b.split()) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def edited(text: str, every: int, start: int, w: Words) -> str:
    words = text.split()
    for i in range(start, len(words), every):
        words[i] = w.take(1)[0]
    return " ".join(words)


def test_near_duplicates_use_exact_jaccard_at_0_8():
    w = Words()
    base = " ".join(w.take(1000))
    close = edited(base, 250, 100, w)  # 4 edits 250 words apart
    far = edited(base, 100, 50, w)  # 10 edits
    other = " ".join(w.take(1000))
    assert shingle_jaccard(base, close) > 0.85
    assert 0.7 < shingle_jaccard(base, far) < 0.8
    # Order decides which copy stays: the first.
    assert dedup.near_duplicates([base, far, close, other]) == [2]
    assert dedup.near_duplicates([close, base]) == [1]
    assert dedup.jaccard(dedup.shingles(base, 13), dedup.shingles(far, 13)) == pytest.approx(
        shingle_jaccard(base, far)
    )


def test_minhash_signatures_estimate_jaccard():
    w = Words()
    base = " ".join(w.take(2000))
    config = dedup.MinHashConfig()
    a = dedup.minhash_signature(dedup.shingles(base, 13), config)
    assert a.shape == (128,) and a.dtype == np.uint64
    errors = []
    for every in range(25, 425, 20):  # 20 variants, Jaccard from about 0.3 to 0.95
        variant = edited(base, every, 7, w)
        truth = shingle_jaccard(base, variant)
        b = dedup.minhash_signature(dedup.shingles(variant, 13), config)
        # Each estimate is a mean of K = 128 agreements, standard error sqrt(J(1-J)/K).
        se = math.sqrt(truth * (1 - truth) / 128)
        assert abs(np.mean(a == b) - truth) < 4 * se + 1e-9, (every, truth)
        errors.append(np.mean(a == b) - truth)
    # Unbiased: the mean error of 20 estimates (its standard error below 0.01).
    assert abs(np.mean(errors)) < 0.025


def test_filter_documents_reports_each_rule_per_source():
    w = Words()
    good = [prose(w) for _ in range(3)]
    near = edited(good[1], 250, 3, w)
    cases = quality_cases()
    docs = [
        Document("web", "a", good[0]),
        Document("web", "b", cases["bullet_lines"]),
        Document("web", "c", good[1]),
        Document("news", "d", good[0]),  # an exact duplicate of web/a, in another source
        Document("news", "e", near),  # a near duplicate of web/c
        Document("news", "f", _REPETITION["top_2gram_char_fraction"]),
        Document("code", "g", "x = 1\n"),  # code skips the prose rules
        Document("code", "h", "x = 1\n"),
        Document("web", "i", "short"),
    ]
    kept, report = filters.filter_documents(docs, code_sources=["code"])
    assert [d.name for d in kept] == ["a", "c", "g"]
    assert report["web"] == {
        **dict.fromkeys(filters.ALL_RULES, 0),
        "input": 4,
        "bullet_lines": 1,
        "word_count": 1,
        "kept": 2,
    }
    assert report["news"]["exact_duplicate"] == 1
    assert report["news"]["near_duplicate"] == 1
    assert report["news"]["top_2gram_char_fraction"] == 1
    assert report["code"]["exact_duplicate"] == 1 and report["code"]["kept"] == 1
    for counts in report.values():
        removed = sum(counts[r] for r in filters.ALL_RULES)
        assert counts["input"] == removed + counts["kept"]
    table = filters.format_report(report)
    assert "bullet_lines" in table and "near_duplicate" in table and "dup_5gram" not in table
    # Without MinHash the near duplicate stays.
    kept, _ = filters.filter_documents(docs, code_sources=["code"], minhash=None)
    assert "e" in [d.name for d in kept]

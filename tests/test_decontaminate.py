"""Test-set overlap removal (gopher.data.decontaminate) against a naive containment oracle."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gopher.data import decontaminate
from gopher.data.decontaminate import ItemNgrams, item_text


def _naive_held(items: dict[str, str], text: str, n: int = 13, threshold: float = 0.8):
    """Items at least `threshold` of whose distinct word n-grams are in `text`: sets of tuples."""

    def grams(t):
        words = re.findall(r"\w+", t.lower())
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    doc = grams(text)
    return sorted(
        name for name, t in items.items() if (g := grams(t)) and len(g & doc) >= threshold * len(g)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_matches_a_naive_containment_oracle(seed):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(12)]  # few words: n-grams shared between items too

    def words(k):
        return [str(w) for w in rng.choice(vocab, size=k)]

    items = {f"t/{i}": " ".join(words(int(rng.integers(8, 40)))) for i in range(40)}
    index = ItemNgrams.from_items(items.items(), ("t",))
    names = list(items)
    outcomes = {"held": 0, "partly": 0}
    for _ in range(60):
        parts = [" ".join(words(int(rng.integers(0, 30))))]
        for _ in range(int(rng.integers(0, 3))):  # pieces of items, some too short to count
            item = items[names[int(rng.integers(len(names)))]].split()
            a = int(rng.integers(0, len(item) // 4 + 1))
            b = int(rng.integers(max(a + 1, len(item) * 3 // 4), len(item) + 1))
            piece = " ".join(item[a:b])
            parts += [piece.upper() if rng.random() < 0.5 else piece, " ".join(words(5))]
        text = " , ".join(parts)
        expected = _naive_held(items, text)
        assert sorted(index.held(text)) == expected, text
        held = set(expected)
        outcomes["held"] += bool(held)
        partly = [n for n in _naive_held(items, text, threshold=0.3) if n not in held]
        outcomes["partly"] += bool(partly)
    # Both sides of the threshold were exercised, not only empty lookups.
    assert outcomes["held"] >= 5 and outcomes["partly"] >= 5, outcomes


def test_an_item_is_found_through_case_punctuation_and_prompt_labels():
    context = (
        "Question: When the tide goes out along the rocky shore of the small northern "
        "island, which animals are left in the shallow pools between the stones?\nAnswer:"
    )
    answer = " crabs, small fish and starfish that could not follow the water back out"
    text = item_text(context, answer)
    assert "Question" not in text and "Answer" not in text
    index = ItemNgrams.from_items([("quiz/7", text)], ("quiz",))
    filler = "The museum opened its doors in the spring and the visitors came from far away. " * 20
    quoted = (
        "when THE tide goes out -- along the rocky shore of the small northern island: which "
        "animals are left in the shallow pools between the stones. Crabs; small fish and "
        "starfish that could not follow the water back out!"
    )
    assert index.held(filler + quoted + filler) == ["quiz/7"]
    words = quoted.split()
    assert index.held(filler + " ".join(words[: len(words) * 3 // 5]) + filler) == []
    # A short item (fewer than 13 words) has no 13-gram: never checked, counted apart.
    short = ItemNgrams.from_items([("quiz/8", "Where is a hamburger likely to be found?")])
    assert short.record()["items_checked"] == 0 and short.held("where is a hamburger") == []


def test_task_names_are_checked():
    assert decontaminate.parse_tasks("none") == () and decontaminate.parse_tasks("") == ()
    assert decontaminate.parse_tasks("lambada, piqa") == ("lambada", "piqa")
    assert "hellaswag" in decontaminate.parse_tasks("all")
    with pytest.raises(ValueError, match=r"unknown test sets \['lambda'\].*all, none or names"):
        decontaminate.parse_tasks("lambda")

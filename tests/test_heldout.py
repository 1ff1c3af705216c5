"""Held-out splits by work, bpb over the original text's bytes, eval batches of their own.

Oracles: exact set overlap (dedup.jaccard), the greedy fill's closed-form error bound,
len(text.encode()), the stream itself, and a one-device forward pass.
"""

from __future__ import annotations

import math
import re
import unicodedata

import jax
import numpy as np
import pytest

from gopher import config, engine, loop, train
from gopher.data import dedup, packing, pipeline, works
from gopher.data.sources import Document, stdlib_documents
from gopher.data.tokenizer import Tokenizer
from gopher.data.works import split_by_work, work_shingles

WORDS = [
    "king",
    "queen",
    "love",
    "death",
    "night",
    "day",
    "sword",
    "crown",
    "heart",
    "blood",
    "honour",
    "grave",
    "letter",
    "ghost",
    "father",
    "mother",
    "brother",
    "sister",
    "friend",
    "enemy",
    "soldier",
    "lord",
    "lady",
    "servant",
    "court",
    "castle",
    "river",
    "forest",
    "storm",
    "fire",
    "water",
    "earth",
    "heaven",
    "hell",
    "word",
    "deed",
    "truth",
    "lie",
    "hope",
    "fear",
]


def _text(rng: np.random.Generator, words: int) -> str:
    lines = []
    for _ in range(words // 10):
        lines.append(" ".join(rng.choice(WORDS, size=10)))
    return "\n".join(lines) + "\n"


def _old_spelling(text: str, rng: np.random.Generator) -> str:
    """A second edition: early-modern spelling on most words (u -> v, a final e added)."""

    def respell(m):
        w = m.group(0)
        if rng.random() < 0.5:
            return w
        return w.replace("u", "v") + ("e" if not w.endswith("e") else "")

    return re.sub(r"[a-z]+", respell, text)


def _nbytes(docs) -> int:
    return sum(len(d.text.encode()) for d in docs)


def _jaccard_raw(a: str, b: str) -> float:
    return dedup.jaccard(dedup.shingles(a, 13), dedup.shingles(b, 13))


def test_editions_and_contained_copies_stay_on_one_side():
    rng = np.random.default_rng(0)
    docs = [Document("books", f"other/{i:03d}.txt", _text(rng, 400)) for i in range(60)]
    modern = _text(rng, 600)
    folio = _old_spelling(modern, rng)
    big = _text(rng, 1200)
    part = big[: len(big) // 3]  # a text inside a larger one, under half its length
    docs += [
        Document("books", "plays/play_modern.txt", modern),
        Document("books", "plays/play_folio.txt", folio),
        Document("books", "anthology/all.txt", big),
        Document("books", "excerpts/part.txt", part),
    ]
    # The editions are far below the dedup threshold, and the part far below in Jaccard.
    assert _jaccard_raw(modern, folio) < dedup.MinHashConfig().threshold / 4
    assert _jaccard_raw(big, part) < 0.5
    a, b = work_shingles(modern), work_shingles(folio)
    assert dedup.jaccard(a, b) >= works.WorkGrouping().jaccard  # folded, they group

    pairs = [
        ("plays/play_modern.txt", "plays/play_folio.txt"),
        ("anthology/all.txt", "excerpts/part.txt"),
    ]
    held_pair = set()
    roots = works.group_works(docs)
    largest = max(
        sum(len(d.text.encode()) for d, r in zip(docs, roots, strict=True) if r == root)
        for root in set(roots)
    )
    for fraction in (0.05, 0.1, 0.2, 0.3, 0.4):
        train_docs, heldout = split_by_work(docs, fraction)
        names = {d.name for d in heldout}
        assert {d.name for d in train_docs}.isdisjoint(names)
        assert len(train_docs) + len(heldout) == len(docs)
        for x, y in pairs:
            assert (x in names) == (y in names), (fraction, x, y)
            held_pair |= {x} & names
        # The greedy fill leaves the held-out bytes within half the largest work of the
        # target (each work taken or left brought the total nearer it).
        share = _nbytes(heldout) / _nbytes(docs)
        assert abs(share - fraction) <= largest / (2 * _nbytes(docs)), fraction
    assert held_pair, "no fraction held either pair out: the test would not see a split pair"
    # The split is a function of the documents, not of their order.
    shuffled = [docs[i] for i in np.random.default_rng(1).permutation(len(docs))]
    assert sorted(d.name for d in split_by_work(shuffled, 0.2)[1]) == sorted(
        d.name for d in split_by_work(docs, 0.2)[1]
    )


def test_stdlib_split_keeps_pydoc_topics_with_topics_py():
    fraction = config.DataConfig().heldout_fraction
    train_docs = stdlib_documents("train", fraction)
    heldout = stdlib_documents("heldout", fraction)
    topics_py = next(d for d in train_docs + heldout if d.name == "pydoc_data/topics.py")
    copies = [d for d in train_docs + heldout if d.name.startswith("pydoc_data/topics/")]
    assert len(copies) > 50
    # They are copies: almost every topic's 13-grams are in topics.py.
    whole = work_shingles(topics_py.text)
    for d in copies:
        mine = work_shingles(d.text)
        assert len(np.intersect1d(mine, whole)) >= 0.9 * len(mine), d.name
    side = topics_py in heldout
    assert all((d in heldout) == side for d in copies)
    share = _nbytes(heldout) / (_nbytes(heldout) + _nbytes(train_docs))
    assert abs(share - fraction) < 0.02  # code files are small: the fill lands close


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    texts = [d.text for d in stdlib_documents("train") if d.source == "python_docs"]
    path = str(tmp_path_factory.mktemp("tok") / "spm.model")
    return Tokenizer.train(texts, 512, path, sample_bytes=300_000)


ODD = "7 caf\u0065\u0301 costs \u00bd\u00a0crown,\u00a0\ufb01ne\n"  # NFKC changes all of these


def test_encode_with_bytes_counts_the_original_utf8_bytes(tokenizer):
    for ch in ("\u00a0", "e\u0301", "\u00bd", "\ufb01"):
        assert len(unicodedata.normalize("NFKC", ch).encode()) != len(ch.encode())
    for text in (ODD, ODD * 3 + "plain ascii", "\u6f22\u5b57 byte fallback", "x"):
        ids, nbytes = tokenizer.encode_with_bytes(text)
        assert ids.tolist() == tokenizer.encode(text)
        assert nbytes.sum() == len(text.encode())  # not the NFKC text's
        assert (nbytes >= 0).all()
    tokens, nbytes = packing.stream_with_bytes(tokenizer, [Document("s", "a", ODD)] * 2)
    assert tokens.tolist() == (tokenizer.encode(ODD) + [tokenizer.eos_id]) * 2
    assert nbytes[tokens == tokenizer.eos_id].sum() == 0


def test_eval_windows_cover_the_stream_once_and_mask_the_padded_tail():
    tokens = np.arange(150, dtype=np.int32) + 3
    weights = np.arange(150) % 4
    batches = list(packing.eval_windows(tokens, weights, 4, 16))
    assert len(batches) == math.ceil(math.ceil(149 / 16) / 4)
    targets = np.concatenate([w[:, 1:][m] for w, m, _ in batches])
    np.testing.assert_array_equal(targets, tokens[1:])  # every target once, in order
    assert sum(n for *_, n in batches) == weights[1:].sum()
    for w, m, n in batches:
        assert w.shape == (4, 17) and m.shape == (4, 16)
        assert n == weights[w[:, 1:][m] - 3].sum()
    assert len(list(packing.eval_windows(tokens, weights, 4, 16, max_batches=1))) == 1
    ((w, m, n),) = packing.eval_windows(tokens[:10], weights[:10], 8, 16)  # < one window
    assert m.sum() == 9 and n == weights[1:10].sum()


def test_a_short_source_is_warned_about_and_still_scored():
    said = []
    tc = config.TrainConfig(eval_batch_size=4, eval_batches=3)
    tokens, weights = np.arange(20, dtype=np.int32), np.ones(20, np.int64)
    windows = pipeline._eval_set("tiny", tokens, weights, tc, 64, said.append)
    assert len(windows) == 1 and windows[0][1].sum() == 19 and windows[0][2] == 19
    assert len(said) == 1 and "'tiny'" in said[0] and "fewer than one window" in said[0]
    assert pipeline._eval_set("empty", tokens[:1], weights[:1], tc, 64, said.append) == []
    assert "not scored" in said[-1]
    # A process's rows keep the whole batch's bytes (every process reads the same).
    ((rows, mask, n),) = pipeline._local_windows(windows, (2, 4))
    assert rows.shape == (2, 65) and mask.shape == (2, 64) and n == 19


def test_evaluate_divides_by_original_bytes_at_its_own_batch_size(tokenizer):
    model = config.get_preset("test")
    # Training batch 16, eval batch 8: the eval batch is its own setting.
    tc = config.TrainConfig(batch_size=16, eval_batch_size=8, eval_batches=4)
    eng = engine.build(model, tc, config.ParallelConfig(data=8))
    state = eng.init(jax.random.key(0))
    docs = [Document("s", f"d{i}", ODD * (i + 1)) for i in range(8)]
    tokens, nbytes = packing.stream_with_bytes(tokenizer, docs)
    windows = list(packing.eval_windows(tokens, nbytes, 8, model.seq_len, 4))
    assert windows[-1][1].sum() < windows[-1][1].size  # the tail is padded
    ev = loop.evaluate(eng, state, {"s": windows})

    # Oracle: one device, the same windows, NLL summed over the unmasked targets only,
    # over the original text's bytes in closed form (the first token, "7", is 1 byte and
    # never a target).
    fns = train.make_train_functions(model, tc)
    params = jax.device_put(jax.device_get(state.params), jax.devices()[0])
    nll = sum(
        float(np.asarray(fns.eval_step(params, w)["nll"], np.float64)[m].sum())
        for w, m, _ in windows
    )
    total_bytes = sum(len(d.text.encode()) for d in docs) - 1
    assert sum(n for *_, n in windows) == total_bytes
    assert sum(len(unicodedata.normalize("NFKC", d.text).encode()) for d in docs) - 1 != total_bytes
    assert ev["heldout/s/bpb"] == pytest.approx(nll / (math.log(2) * total_bytes), rel=1e-4)
    assert ev["heldout_loss"] == pytest.approx(nll / (len(tokens) - 1), rel=1e-4)


def test_an_old_corpus_format_is_refused_or_rebuilt(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "gopher-corpus/1"}')
    data = config.DataConfig(source="embedded", corpus_dir=str(tmp_path))
    with pytest.raises(ValueError, match="format 'gopher-corpus/1'.*prepare_data"):
        pipeline.build_pipeline(
            config.get_preset("test"), config.TrainConfig(), data, str(tmp_path)
        )

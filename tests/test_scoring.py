"""Scoring against independent oracles: a bigram table (closed form in numpy) wrapped as a
model, and a real randomly initialised Gopher scored one request at a time on one device."""

from __future__ import annotations

import dataclasses
import itertools
import math
import unicodedata

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gopher import sharding
from gopher.config import DataConfig, ParallelConfig, get_preset
from gopher.data.pipeline import heldout_documents
from gopher.data.sources import stdlib_documents
from gopher.data.tokenizer import Tokenizer
from gopher.evals import harness
from gopher.evals.scoring import Request, Scorer, request_row, stream_windows
from gopher.evals.tasks import Item, Task
from gopher.inference import LoadedModel, from_params
from gopher.model import build_forward

VOCAB = 512
CFG = get_preset("test")  # seq_len 64, vocab 512


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    docs = stdlib_documents("train", 0.05)[:400]
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return Tokenizer.train([d.text for d in docs], VOCAB, path, sample_bytes=300_000)


def _bigram_table(seed=0, favour=()):
    table = np.random.default_rng(seed).normal(0, 2.0, (VOCAB, VOCAB)).astype(np.float32)
    for a, b in favour:  # make b the greedy choice after a
        table[a, b] = table[a].max() + 5.0
    return table


def _bigram_model(tokenizer, table, parallel: ParallelConfig | None = None) -> LoadedModel:
    mesh = sharding.make_mesh(parallel or ParallelConfig(data=8))
    params = jax.device_put(table, NamedSharding(mesh, P()))
    return LoadedModel(CFG, params, lambda p, tokens: p[tokens], tokenizer, mesh)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _log_probs(table):
    return _log_softmax(table)  # row a: log p(next | a)


def _oracle_request(tokenizer, table, context, continuation, move_space=True):
    """(sum log p, tokens, greedy, UTF-8 bytes) of the continuation under the bigram, in
    float64. The context's trailing whitespace is scored as the continuation's start
    (lm-evaluation-harness's rule), moved here a character at a time: this oracle's own
    code, so a broken rule in the scorer shows (`move_space=False`: the request as given)."""
    while move_space and context and context[-1].isspace():
        context, continuation = context[:-1], context[-1] + continuation
    lp = _log_probs(table)
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    seq = [tokenizer.eos_id, *ctx, *cont]
    pos = range(len(seq) - len(cont), len(seq))
    total = sum(lp[seq[i - 1], seq[i]] for i in pos)
    greedy = all(int(np.argmax(table[seq[i - 1]])) == seq[i] for i in pos)
    return total, len(cont), greedy, len(continuation.encode("utf-8"))


def _oracle_text_nll(tokenizer, table, text, close=True):
    """Sum NLL and targets of [EOS] + text + [EOS] (close=False: no closing EOS)."""
    lp = _log_probs(table)
    s = [tokenizer.eos_id, *tokenizer.encode(text), *([tokenizer.eos_id] if close else [])]
    return -sum(lp[a, b] for a, b in zip(s[:-1], s[1:], strict=False)), len(s) - 1


REQUESTS = [
    Request("The quick brown fox", " jumps over the lazy dog."),
    Request("def f(x):\n    return", " x + 1"),
    Request("", "A continuation with no context."),
    Request("Question: what is 2 + 2?\nAnswer:", " 4"),
    Request("x" * 300, " tail past max_len"),  # longer than 4 x seq_len tokens: truncated
]


def test_bigram_requests_match_closed_form(tokenizer):
    favoured = Request("Question: what is 2 + 2?\nAnswer:", " four")
    seq = [tokenizer.eos_id, *tokenizer.encode(favoured.context)]
    seq += tokenizer.encode(favoured.continuation)
    table = _bigram_table(favour=list(zip(seq[:-1], seq[1:], strict=False)))
    scorer = Scorer(_bigram_model(tokenizer, table), batch_size=4)
    requests = [*REQUESTS, favoured] * 3  # 18 rows: full and partial batches
    scores = scorer.score_requests(requests)
    for r, s in zip(requests, scores, strict=True):
        want, n, greedy, _ = _oracle_request(tokenizer, table, r.context, r.continuation)
        assert s.num_tokens == n and s.num_bytes == len(r.continuation.encode())
        np.testing.assert_allclose(s.logprob, want, rtol=1e-5)
        assert s.greedy == greedy
        # Input tokens run: [EOS] + context + continuation less the last, at most max_len.
        assert s.length == min(len(tokenizer.encode(r.context)) + n, 4 * CFG.seq_len)
    assert scores[-1].greedy and not scores[0].greedy
    assert scores[4].truncated > 0 and scores[0].truncated == 0  # the 300-x context


def test_a_contexts_trailing_space_is_scored_with_the_continuation(tokenizer):
    """ "Answer: " + "Paris" is scored as "Answer:" + " Paris" (the space starts the word's
    token, as in training text; lm-evaluation-harness's rule): the closed form of the
    moved request, its bytes included."""
    table = _bigram_table(seed=3)
    scorer = Scorer(_bigram_model(tokenizer, table), batch_size=4)
    got, moved = scorer.score_requests([Request("Answer: ", "Paris"), Request("Answer:", " Paris")])
    want, n, _, _ = _oracle_request(tokenizer, table, "Answer:", " Paris", move_space=False)
    assert tokenizer.encode(" Paris") != tokenizer.encode("Paris")  # the case matters
    np.testing.assert_allclose(got.logprob, want, rtol=1e-5)
    assert got.num_tokens == n and got.num_bytes == len(" Paris") == moved.num_bytes


def test_scored_tokens_decode_to_the_continuation(tokenizer):
    joins = [("The value is ", "returned"), ("in", "to")]
    for r in [*REQUESTS, *(Request(c, k) for c, k in joins)]:
        row, _ = request_row(
            tokenizer.encode(r.context), tokenizer.encode(r.continuation), tokenizer.eos_id, 256
        )
        assert tokenizer.decode(row.targets[row.mask]) == r.continuation
    # Why apart: encoding the joined string merges across the boundary on real examples.
    for context, continuation in joins:  # joined: "▁return" "ed" and "int" "o"
        joined = tokenizer.encode(context + continuation)
        assert joined != tokenizer.encode(context) + tokenizer.encode(continuation)


def _task(name, kind, items):
    chance = 0.0 if kind == "lambada" else float(np.mean([1 / len(i.continuations) for i in items]))
    return Task(name, kind, tuple(items), chance, "hand-made", "test", "test")


def test_bigram_task_metrics_match_closed_form(tokenizer):
    table = _bigram_table(seed=1)
    scorer = Scorer(_bigram_model(tokenizer, table), batch_size=8)
    contexts = ["The sky is", "Water is", "A cat says", "def main():\n   ", "Snow is", "Ice is"]
    choices = [(" blue", " green", " made of cheese"), (" wet", " dry"), (" meow", " woof", " x")]
    items = [
        Item(i, (c,) * len(k), k, gold=i % len(k))
        for i, (c, k) in enumerate(zip(contexts, choices * 2, strict=True))
    ]
    got = harness.evaluate_task(scorer, _task("mc", "multiple_choice", items))
    flat = [Request(c, k) for i in items for c, k in zip(i.contexts, i.continuations, strict=True)]
    scores, at = scorer.score_requests(flat), 0

    def picks(oracle):  # the oracle's choice per metric
        lp, tokens, nbytes = (np.array([o[j] for o in oracle], np.float64) for j in (0, 1, 3))
        return {
            "accuracy": int(np.argmax(lp)),
            "acc_per_token": int(np.argmax(lp / tokens)),
            "acc_per_byte": int(np.argmax(lp / nbytes)),
        }

    hits = {"accuracy": [], "acc_per_token": [], "acc_per_byte": []}
    for item in items:
        pairs = list(zip(item.contexts, item.continuations, strict=True))
        want = picks([_oracle_request(tokenizer, table, c, k) for c, k in pairs])
        mine = scores[at : at + len(pairs)]
        at += len(pairs)
        for name, pick in want.items():
            # The harness's own pick for this item: a hit exactly when gold is the oracle's.
            assert harness.multiple_choice_metrics([pick], [mine])[name] == 1.0, (item, name)
            hits[name].append(pick == item.gold)
    for name, h in hits.items():
        assert got[name] == pytest.approx(np.mean(h)), name
    # The items exercise the trailing-space rule: "def main():\n   " picks another choice
    # per byte when its spaces stay in the context, so a broken rule fails the loop above.
    spaced = items[3]
    assert spaced.contexts[0].endswith(" ")
    pairs = list(zip(spaced.contexts, spaced.continuations, strict=True))
    moved = picks([_oracle_request(tokenizer, table, c, k) for c, k in pairs])
    kept = picks([_oracle_request(tokenizer, table, c, k, move_space=False) for c, k in pairs])
    assert moved["acc_per_byte"] != kept["acc_per_byte"]
    assert got["items"] == len(items) and got["chance"] == pytest.approx(
        (1 / 3 + 1 / 2 + 1 / 3) / 3
    )

    words = [("It was a dark and stormy", " night"), ("She opened the", " door")]
    seq = [tokenizer.eos_id, *tokenizer.encode(words[0][0]), *tokenizer.encode(words[0][1])]
    table = _bigram_table(
        seed=2, favour=list(zip(seq[:-1], seq[1:], strict=False))
    )  # only the first right
    scorer = Scorer(_bigram_model(tokenizer, table), batch_size=8)
    got = harness.evaluate_task(
        scorer,
        _task("lambada", "lambada", [Item(i, (c,), (w,), 0) for i, (c, w) in enumerate(words)]),
    )
    oracle = [_oracle_request(tokenizer, table, c, w) for c, w in words]
    nll, tokens = -sum(o[0] for o in oracle), sum(o[1] for o in oracle)
    assert got["accuracy"] == pytest.approx(np.mean([o[2] for o in oracle])) == 0.5
    # Named per token: the bare name reads as the per-word value published for LAMBADA.
    assert "perplexity" not in got
    assert got["perplexity_per_token"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert got["perplexity_per_word"] == pytest.approx(math.exp(nll / len(words)), rel=1e-5)


def test_items_past_max_len_are_truncated_or_skipped_and_counted(tokenizer):
    """An item whose continuation alone passes max_len is skipped whole and counted; one
    with a long context loses its first tokens (the bigram's score of the continuation
    depends only on the token before each, so the untruncated closed form still holds);
    the others score as if the skipped item were not there."""
    max_len = 24
    table = _bigram_table(seed=3)
    scorer = Scorer(_bigram_model(tokenizer, table), batch_size=8, max_len=max_len)
    long_cont = " and then" * 20
    assert len(tokenizer.encode(long_cont)) > max_len
    items = [
        Item(0, ("The sky is",) * 2, (" blue", " green"), 0),
        Item(1, ("Water is",) * 2, (" wet", long_cont), 1),  # skipped: one choice too long
        Item(2, ("word " * 40,) * 2, (" end", " stop"), 1),  # context truncated
        Item(3, ("A cat says",) * 3, (" meow", " woof", " x"), 0),
    ]
    kept = [items[0], items[2], items[3]]
    got = harness.evaluate_task(scorer, _task("mc", "multiple_choice", items))
    hits = []
    for item in kept:
        lp = [
            _oracle_request(tokenizer, table, c, k)[0]
            for c, k in zip(item.contexts, item.continuations, strict=True)
        ]
        hits.append(np.argmax(lp) == item.gold)
    assert got["accuracy"] == pytest.approx(np.mean(hits))
    assert got["items"] == 3 and got["skipped_items"] == 1 and got["truncated_requests"] == 2
    assert got["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)  # of the items scored
    alone = harness.evaluate_task(scorer, _task("mc", "multiple_choice", kept))
    for name in ("accuracy", "acc_per_token", "acc_per_byte", "chance", "items"):
        assert got[name] == alone[name], name
    assert "skipped items 1" in harness.markdown_table({"mc": got})
    with pytest.raises(ValueError, match=r"every item .* pass --max_len=\d+"):
        harness.evaluate_task(scorer, _task("mc", "multiple_choice", [items[1]]))


def test_requests_past_seq_len_are_counted_as_extrapolated(tokenizer):
    """Rows longer than the training seq_len (64) run extrapolated, up to max_len (256):
    counted per request and shown, beside the truncated ones (which run at max_len, so
    are extrapolated too)."""
    table = _bigram_table(seed=5)
    scorer = Scorer(_bigram_model(tokenizer, table), batch_size=8)
    long, longer = ("word " * 25).strip(), ("word " * 80).strip()  # 4 tokens a "word "
    assert CFG.seq_len < len(tokenizer.encode(long)) < 4 * CFG.seq_len
    items = [
        Item(0, ("The sky is",) * 2, (" blue", " green"), 0),
        Item(1, (long,) * 2, (" end", " stop"), 1),  # extrapolated
        Item(2, (longer,) * 2, (" end", " stop"), 1),  # truncated to 256, extrapolated
    ]
    got = harness.evaluate_task(scorer, _task("mc", "multiple_choice", items))
    assert got["extrapolated_requests"] == 4 and got["truncated_requests"] == 2
    table_md = harness.markdown_table({"mc": got})
    assert "truncated requests 2, extrapolated requests 4" in table_md
    short = harness.evaluate_task(scorer, _task("mc", "multiple_choice", items[:1]))
    assert short["extrapolated_requests"] == 0


def test_windows_score_every_target_exactly_once():
    """Of a whole document's stream, [EOS] + ids + [EOS], and of a cut one's (close=False),
    [EOS] + ids: its end is not the document's, so no EOS target."""
    ids = np.arange(10, 10 + 57, dtype=np.int32)
    eos = 2
    cases = [(16, 8), (16, 16), (16, 1), (16, 5), (64, 32), (100, 50), (1, 1), (56, 56)]
    for (window, stride), close in itertools.product(cases, (True, False)):
        stream = np.concatenate([[eos], ids, [eos] if close else []]).astype(np.int32)
        rows = stream_windows(ids, eos, window, stride, close=close)
        targets = np.concatenate([r.targets[r.mask] for r in rows])
        np.testing.assert_array_equal(targets, stream[1:])  # each once, in order
        for r in rows:
            assert len(r.inputs) <= window and r.mask[-1]  # rows end at their last new target
            np.testing.assert_array_equal(r.targets[:-1], r.inputs[1:])
            # Each scored target sees the whole stream before it (a row starting at the
            # stream's start) or at least window - stride + 1 tokens of it: rows overlap.
            start = 0 if r.inputs[0] == eos else int(r.inputs[0]) - 10 + 1  # in the stream
            context = np.flatnonzero(r.mask) + 1  # inputs a scored target is predicted from
            assert start == 0 or context.min() >= window - stride + 1, (window, stride)
    with pytest.raises(ValueError, match="stride"):
        stream_windows(ids, eos, 16, 17)


def test_bigram_bpb_uses_the_texts_own_bytes(tokenizer):
    texts = [
        "Non\u00a0breaking space, caf" + "e\u0301" + " and \u00bd a cup.\n" * 3,
        "def area(r):\n    return 3.14159 * r * r  # \u00bd\u00a0" * 9,
        "short",
    ]
    for t in texts[:2]:  # NFKC changes these texts' byte length: the tokens cannot count it
        assert len(unicodedata.normalize("NFKC", t).encode()) != len(t.encode())
    lengths = tokenizer.token_byte_lengths()
    table = _bigram_table(seed=3)
    oracle = [_oracle_text_nll(tokenizer, table, t) for t in texts]
    num_bytes = sum(len(t.encode()) for t in texts)
    assert num_bytes != sum(lengths[tokenizer.encode(t)].sum() for t in texts)
    want = sum(o[0] for o in oracle) / (math.log(2) * num_bytes)
    scorer = Scorer(_bigram_model(tokenizer, table, ParallelConfig(data=4, model=2)), batch_size=4)
    for window, stride in [(64, 32), (96, 48), (128, 64), (16, 3), (40, 40)]:
        got = scorer.bits_per_byte(texts, window, stride)
        assert got["bpb"] == pytest.approx(want, rel=1e-5)
        assert got["tokens"] == sum(o[1] for o in oracle) and got["bytes"] == num_bytes
    nll, count = scorer.text_nll(texts, 32, 7)
    np.testing.assert_allclose(nll, [o[0] for o in oracle], rtol=1e-5)
    np.testing.assert_array_equal(count, [o[1] for o in oracle])
    # Cut documents (close=False) and a whole one together: no EOS target for the cut ones.
    closes = [False, True, False]
    oracle = [_oracle_text_nll(tokenizer, table, t, c) for t, c in zip(texts, closes, strict=True)]
    nll, count = scorer.text_nll(texts, 32, 7, close=closes)
    np.testing.assert_allclose(nll, [o[0] for o in oracle], rtol=1e-5)
    np.testing.assert_array_equal(count, [o[1] for o in oracle])


def test_split_bytes_add_up(tokenizer):
    data = DataConfig(source="stdlib", heldout_fraction=0.01)
    docs = [d for docs in heldout_documents(CFG, data, "").values() for d in docs][:60]
    texts = [d.text for d in docs]
    scorer = Scorer(_bigram_model(tokenizer, _bigram_table(seed=4)), batch_size=32)
    got = harness.evaluate_text(scorer, texts)
    assert got["bytes"] == sum(len(d.text.encode("utf-8")) for d in docs)
    assert got["tokens"] == sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))
    assert got["bpb"] == pytest.approx(got["bpb_1.5x"], rel=1e-5)  # a bigram: any window
    assert (got["window"], got["window_1.5x"], got["window_2x"]) == (64, 96, 128)
    assert got["stride"] == 32 and got["documents"] == len(docs)
    assert got["streams"] == "per_document"  # not the in-training eval's packed stream


def test_gopher_sharded_scores_equal_one_at_a_time(tokenizer):
    """Random `test` Gopher on a (4, 2) data x model mesh: batched, bucketed and padded
    scores of mixed lengths (some past seq_len 64, one past max_len 256) equal each
    request alone, unpadded, on one device."""
    forward = build_forward(CFG)
    # Jitted: haiku's eager init of this model takes ~3 s, compiling it ~1 s.
    params = jax.jit(forward.init)(jax.random.key(0), np.zeros((1, 8), np.int32))
    cpu0 = jax.devices()[0]
    one_params = jax.device_put(jax.device_get(params), cpu0)
    mesh = sharding.make_mesh(ParallelConfig(data=4, model=2))
    model = from_params(CFG, params, tokenizer, mesh)
    words = ["the", "model", "runs", "past", "its", "training", "length", "with", "relative"]
    fox = "The quick brown fox jumps over the lazy"
    # Four lengths (one oracle compile each) in four buckets, rows sharing a bucket.
    requests = [Request("the", " model")]
    requests += [Request(fox, end) for end in (" dog.", " fog.", " log.")]
    requests += [Request(" ".join(words[:3]) * 7, " dog.")]  # past seq_len
    requests += [Request(" ".join(words) * 19, end) for end in (" dog.", " fog.")]  # past max_len
    scorer = Scorer(model, batch_size=4)
    scores = scorer.score_requests(requests)
    lengths = [
        1 + len(tokenizer.encode(r.context)) + s.num_tokens
        for r, s in zip(requests, scores, strict=True)
    ]
    assert lengths[0] < 16 and lengths[1] == lengths[3] < 64 and 64 < lengths[4] <= 128
    assert lengths[5] == lengths[6] > 257 and scores[5].truncated == lengths[5] - 257
    assert scorer.timings.compiles == 4  # one program per bucket, not per length
    one_device = jax.jit(forward.apply)  # committed to cpu0 by its arguments
    for r, s in zip(requests, scores, strict=True):
        cont = tokenizer.encode(r.continuation)
        seq = np.array([tokenizer.eos_id, *tokenizer.encode(r.context), *cont], np.int32)
        seq = seq[-(4 * CFG.seq_len + 1) :]
        logits = np.asarray(one_device(one_params, jax.device_put(seq[None, :-1], cpu0)))[
            0, -len(cont) :
        ]
        want = _log_softmax(logits)[np.arange(len(cont)), cont].sum()
        np.testing.assert_allclose(s.logprob, want, rtol=1e-5)
        assert s.greedy == all(np.argmax(logits, 1) == cont) and s.num_tokens == len(cont)
    text = " ".join(words * 8)
    for stride in (32, 17, 64):
        _, count = scorer.text_nll([text, "tail"], 64, stride)
        assert list(count) == [len(tokenizer.encode(text)) + 1, len(tokenizer.encode("tail")) + 1]


def _window_start(p: int, window: int, stride: int) -> int:
    """Where the window that scores target p of a stream starts: windows start every
    `stride` tokens and the one at k * stride predicts targets k * stride + 1 ..
    k * stride + window; a target goes to the first window that reaches it."""
    return max(0, -(-(p - window) // stride)) * stride


def _random_model(cfg, seed: int, tokenizer):
    """A random Gopher of `cfg` sharded over 8 data devices for the Scorer, and the same
    weights on one device for an oracle: (model, jitted apply, its params, that device)."""
    forward = build_forward(cfg)
    # Jitted: haiku's eager init of this model takes ~3 s, compiling it ~1 s.
    params = jax.jit(forward.init)(jax.random.key(seed), np.zeros((1, 8), np.int32))
    cpu0 = jax.devices()[0]
    one_params = jax.device_put(jax.device_get(params), cpu0)
    model = from_params(cfg, params, tokenizer, sharding.make_mesh(ParallelConfig(data=8)))
    return model, jax.jit(forward.apply), one_params, cpu0


def test_gopher_text_nll_gives_each_target_its_windows_context(tokenizer):
    """Random `test` Gopher (context-dependent, unlike the bigram): text_nll of a text
    longer than the window equals the sum, over its targets, of each target's NLL from a
    forward pass of exactly the tokens its window gives it, s[start:p] (one pass per
    window start, over its last target's context: the model is causal, test_model.py);
    a text shorter than the window, one pass over the whole stream. Windows of 24 and of
    80 (past seq_len 64: relative attention extrapolating)."""
    text = "The history of the river towns is one of floods, trade and slow rebuilding. " * 3
    text += "The towns grew."
    # 160 targets: every window below is whole, so the oracle compiles one length each.
    assert len(tokenizer.encode(text)) + 1 == 160
    # Weights at 50x the default scale: each prediction leans on its context enough that
    # one token of context less moves the total by ~2% (at 0.02, ~0.01%).
    cfg = dataclasses.replace(CFG, init_scale=1.0)
    model, one_device, one_params, cpu0 = _random_model(cfg, 1, tokenizer)
    scorer = Scorer(model, batch_size=8)

    def oracle(text, window, stride, drop=0):
        """Sum NLL and targets; `drop`: the first tokens of each later window's context
        left out (what a wrong start would do)."""
        s = np.array([tokenizer.eos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int32)
        by_start: dict[int, list[int]] = {}
        for p in range(1, len(s)):
            by_start.setdefault(_window_start(p, window, stride), []).append(p)
        nll = 0.0
        for start, targets in by_start.items():
            start += drop if start else 0
            x = jax.device_put(s[None, start : max(targets)], cpu0)
            lp = _log_softmax(np.asarray(one_device(one_params, x))[0])
            nll -= sum(lp[p - 1 - start, s[p]] for p in targets)
        return nll, len(s) - 1

    for window, stride in [(24, 8), (80, 40)]:
        want = [oracle(t, window, stride) for t in (text, "tail")]
        assert want[0][1] > window + stride and want[1][1] < window  # 3+ windows; one
        nll, count = scorer.text_nll([text, "tail"], window, stride)
        np.testing.assert_allclose(nll, [w[0] for w in want], rtol=1e-6)
        np.testing.assert_array_equal(count, [w[1] for w in want])
    # The tolerance sees a wrong context: windows that do not overlap (the same length,
    # no compile) or that start one token late each give another total.
    for wrong in (oracle(text, 80, 80), oracle(text, 80, 40, drop=1)):
        assert abs(wrong[0] - want[0][0]) > 1e3 * 1e-6 * want[0][0]


def test_gopher_cut_document_has_no_eos_target(tokenizer):
    """Random `test` Gopher: a document cut to a length (close=False) scores exactly its
    kept tokens, sum -log p(s[p] | s[:p]) over [EOS] + its tokens from one forward pass,
    with no EOS target after them; a whole document beside it in the same call keeps its
    closing EOS (the same pass over [EOS] + tokens + [EOS])."""
    model, one_device, one_params, cpu0 = _random_model(CFG, 2, tokenizer)
    texts = ["The towns grew, and", "The towns grew."]  # the first cut mid-sentence

    def oracle(text, close):
        s = [tokenizer.eos_id, *tokenizer.encode(text), *([tokenizer.eos_id] if close else [])]
        n = len(s) - 1  # targets s[1:]
        # One pass over s[:-1], right-padded to 16 (one compile; causal: the padding
        # after position p does not reach its logits).
        x = np.zeros((1, 16), np.int32)
        x[0, :n] = s[:-1]
        lp = _log_softmax(np.asarray(one_device(one_params, jax.device_put(x, cpu0)))[0, :n])
        return -lp[np.arange(n), s[1:]].sum(), n

    scorer = Scorer(model, batch_size=8)
    want = {(t, c): oracle(t, c) for t in texts for c in (True, False)}
    assert all(n <= 16 for _, n in want.values())  # one window, one bucket each
    for closes in ([False, True], [True, True], [False, False]):
        nll, count = scorer.text_nll(texts, CFG.seq_len, close=closes)
        pairs = list(zip(texts, closes, strict=True))
        np.testing.assert_allclose(nll, [want[p][0] for p in pairs], rtol=1e-5)
        np.testing.assert_array_equal(count, [want[p][1] for p in pairs])
    # The closing EOS is a real share of the total, far past the tolerance.
    cut, whole = want[texts[0], False][0], want[texts[0], True][0]
    assert whole - cut > 1e3 * 1e-5 * cut

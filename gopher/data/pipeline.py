"""What the training loop reads: one interface over the data sources.

  stdlib    the CPython standard library's sources and docs (every Python has them),
            one stream sampled as a pure function of (seed, step)
  files     local text files, the same way
  embedded  the MassiveText-style embedded corpus (gopher.data.corpus), built on first
            use, read through the weighted, resumable, host-sharded Mixture

Every pipeline gives `next_batch(B, rows)` (this host's rows [lo, hi) of the next global
batch of B sequences, [hi - lo, T+1] int32), `state()` / `restore()` (saved beside each
checkpoint), `stats()` (per-source accounting for the logs), held-out
windows per source, and a unigram baseline in bits per byte.

Held-out windows come in batches of `train.eval_batch_size` sequences, whatever the
training batch, so every source is scored at every model size: consecutive windows of
T + 1 tokens over the source's whole held-out stream, the tail padded and masked, at
most `train.eval_batches` batches, each with the UTF-8 bytes of the original text its
unmasked targets stand for (bits per byte's denominator). A source with fewer tokens
than one window is scored on what it has, with a warning.

The stream is read in blocks of `train.batch_size` sequences: a batch of k times that
(a batch schedule's later batch) is the next k blocks, so a run whose batch grows reads
the very sequences a run at the first batch would, and the data state counts blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from gopher import paths
from gopher.config import DataConfig, ModelConfig, TrainConfig
from gopher.data.packing import TokenDataset, eval_windows, stream_with_bytes
from gopher.data.proportions import parse_weights
from gopher.data.sources import (
    Document,
    read_text_files,
    split_files,
    stdlib_documents,
    unigram_bits_per_byte,
)
from gopher.data.tokenizer import Tokenizer, TrainingError


@dataclasses.dataclass
class Pipeline:
    tokenizer: Tokenizer
    next_batch: Callable[[int, tuple[int, int]], np.ndarray]  # (B, (lo, hi)) -> rows
    state: Callable[[], dict]
    restore: Callable[[dict], None]
    stats: Callable[[], dict]
    # source -> [(this process's rows [b, T+1] int32, their target mask [b, T] bool, UTF-8
    # bytes of the whole eval batch's unmasked targets)], batches of train.eval_batch_size
    eval_sets: dict[str, list]
    unigram_bpb: float
    summary: str
    fingerprint: str = ""  # sha256 of the data itself: every host of a job must agree
    # stdlib / files: sha256 of the held-out documents' texts (heldout_digest), which
    # config.json records so that evaluate --heldout scores those same documents
    heldout_sha256: str = ""


def data_fingerprint(*arrays, manifest: dict | None = None) -> str:
    """sha256 of a data source: its corpus manifest (its sources' counts and its
    tokenizer's sha256; `Mixture.from_corpus` checks the token files against them), or
    its token arrays."""
    h = hashlib.sha256()
    if manifest is not None:
        h.update(json.dumps(manifest, sort_keys=True).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def heldout_digest(texts) -> str:
    """sha256 of documents' texts in order (each length-prefixed: unambiguous)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def check_heldout(docs: Sequence[Document], recorded: str | None, paths_given: Sequence[str]):
    """Refuses held-out documents other than those the run held out (config.json's
    heldout_sha256; runs recorded before it: not checked)."""
    if not recorded or heldout_digest(d.text for d in docs) == recorded:
        return
    raise ValueError(
        f"the held-out split of {', '.join(paths_given) or 'the data'} is not the run's: "
        "other documents would be scored as held-out (a glob's or a named file's side "
        "hashes its path, directory included, so moving it moves the split; the stdlib "
        "source differs between Python versions); pass the data as the run named it "
        "(config.json data.paths) or as the directory holding it"
    )


def _split(data: DataConfig) -> tuple[list[Document], list[Document], str]:
    """(train, heldout, how the split was made) of a stdlib or files source."""
    if data.source == "stdlib":
        train = stdlib_documents("train", data.heldout_fraction)
        return train, stdlib_documents("heldout", data.heldout_fraction), "by work"
    return split_files(read_text_files(list(data.paths)), data.heldout_fraction)


def _documents(data: DataConfig, split: str) -> list[Document]:
    train, heldout, _ = _split(data)
    return heldout if split == "heldout" else train


def _tokenizer(data: DataConfig, vocab_size: int, workdir: str, docs) -> Tokenizer:
    """The configured tokenizer, or one trained on the training documents into the workdir."""
    path = data.tokenizer_path or paths.join(workdir, "tokenizer.model")
    if paths.resolve(path).is_file():
        try:
            tok = Tokenizer.load(path)
        except ValueError:
            if data.tokenizer_path:
                fix = "fix --config.data.tokenizer_path (or leave it empty to train one)"
            else:  # the run's own: training it again from the same text gives the same model
                fix = "delete it and rerun: the run trains it again from the data"
            raise ValueError(
                f"tokenizer {path!r} is not a SentencePiece model (damaged?); {fix}"
            ) from None
    elif data.tokenizer_path:
        raise ValueError(f"tokenizer {path!r} does not exist; fix --config.data.tokenizer_path")
    else:
        try:
            tok = Tokenizer.train(
                (d.text for d in docs), vocab_size, path, sample_bytes=data.tokenizer_sample_bytes
            )
        except TrainingError as e:
            raise ValueError(
                e.with_flags("--config.model.vocab_size", "--config.data.tokenizer_sample_bytes")
            ) from None
    if tok.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer {path!r} has {tok.vocab_size} pieces but the model's vocab_size is "
            f"{vocab_size}; set --config.model.vocab_size={tok.vocab_size} or use another tokenizer"
        )
    if not 0 <= tok.eos_id < tok.vocab_size:
        # SentencePiece says -1 for a model trained without one: every document would end
        # in token -1, which reads the last embedding row and counts its bytes in bpb.
        raise ValueError(
            f"tokenizer {path!r} has no end-of-document piece (eos_id={tok.eos_id}); train "
            "it with an EOS id (SentencePiece's --eos_id=2, its default) or leave "
            "--config.data.tokenizer_path empty to train one"
        )
    return tok


def _unigram(train_streams, eval_sets, vocab_size) -> float:
    windows = [w for ws in eval_sets.values() for w in ws]
    return unigram_bits_per_byte(
        [s if isinstance(s, np.ndarray) else np.asarray(s) for s in train_streams],
        np.concatenate([w[:, 1:][m] for w, m, _ in windows]),
        sum(n for *_, n in windows),
        vocab_size,
    )


def _eval_set(source, tokens, target_bytes, train_cfg, seq_len, say) -> list:
    """Global eval batches of one source's held-out stream; warns when it is short."""
    n = len(tokens)
    if n < 2:
        say(f"warning: source {source!r} has {n} held-out tokens: not scored")
        return []
    if n < seq_len + 1:
        say(
            f"warning: source {source!r} has {n:,} held-out tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}; scored on those {n - 1:,} targets"
        )
    return list(
        eval_windows(
            tokens, target_bytes, train_cfg.eval_batch_size, seq_len, train_cfg.eval_batches
        )
    )


def _no_eval_error(t, corpus_dir: str | None = None):
    fix = (
        "raise --config.data.heldout_fraction or give more text"
        if corpus_dir is None  # the embedded corpus's split is fixed when it is built
        else f"rebuild {corpus_dir} with a larger --heldout_fraction "
        "(python -m experiments.prepare_data)"
    )
    return ValueError(
        f"no source has a held-out split of 2 tokens or more to score at seq_len {t}; {fix}"
    )


def _local_windows(windows: list, rows) -> list:
    """This process's rows of global held-out eval batches ([B, T+1] windows, [B, T]
    masks), each kept with the UTF-8 bytes of the whole batch's targets (every host
    reads the same windows)."""
    lo, hi = rows
    return [(w[lo:hi], m[lo:hi], n) for w, m, n in windows]


def _text_pipeline(model_cfg, train_cfg, data_cfg, workdir, rows, eval_rows, say) -> Pipeline:
    train_docs, heldout_docs, rule = _split(data_cfg)
    say(f"held-out split of {data_cfg.source}: {rule}")
    tokenizer = _tokenizer(data_cfg, model_cfg.vocab_size, workdir, train_docs)
    cache = data_cfg.cache_dir or _token_cache_dir(workdir)
    train_ds = TokenDataset.from_documents(tokenizer, train_docs, train_cfg.seed, cache)
    heldout_tokens, heldout_bytes = stream_with_bytes(tokenizer, heldout_docs)
    b, t = train_cfg.batch_size, model_cfg.seq_len
    windows = _eval_set(data_cfg.source, heldout_tokens, heldout_bytes, train_cfg, t, say)
    if not windows:
        raise _no_eval_error(t)
    unigram = _unigram([train_ds.tokens], {data_cfg.source: windows}, tokenizer.vocab_size)
    eval_sets = {data_cfg.source: _local_windows(windows, eval_rows)}
    position = {"step": 0}  # blocks of b sequences read

    def next_batch(global_batch, rows):  # this host's rows of the next global_batch // b blocks
        lo, hi = rows
        parts = []
        for j in range(global_batch // b):
            position["step"] += 1
            first, last = max(lo - j * b, 0), min(hi - j * b, b)  # block j's share of the rows
            if first < last:
                parts.append(train_ds.batch_at(position["step"], b, t)[first:last])
        return np.concatenate(parts)

    return Pipeline(
        tokenizer=tokenizer,
        next_batch=next_batch,
        state=lambda: {"source": data_cfg.source, "step": position["step"]},
        restore=lambda s: position.update(step=int(s["step"])),
        stats=lambda: {f"data/{data_cfg.source}/tokens": position["step"] * b * t},
        eval_sets=eval_sets,
        unigram_bpb=unigram,
        fingerprint=data_fingerprint(train_ds.tokens, heldout_tokens, heldout_bytes),
        heldout_sha256=heldout_digest(d.text for d in heldout_docs),
        summary=(
            f"data: {data_cfg.source}, {len(train_docs)} train docs "
            f"({train_ds.num_tokens:,} tokens), {len(heldout_docs)} held-out docs "
            f"({len(heldout_tokens):,} tokens); unigram baseline {unigram:.3f} bits/byte"
        ),
    )


def _token_cache_dir(workdir: str) -> str:
    """Where tokenised text is cached: memory-mapped, so on local disk even for a gs://
    workdir (keyed by content, so runs can share it)."""
    if paths.is_remote(workdir):
        from gopher.data.corpus import DEFAULT_CACHE_DIR

        return os.path.join(DEFAULT_CACHE_DIR, "tokens")
    return os.path.join(workdir, "data")


def default_corpus_dir(vocab_size: int) -> str:
    from gopher.data.corpus import DEFAULT_CACHE_DIR

    return os.path.join(DEFAULT_CACHE_DIR, f"embedded-{vocab_size}")


def _corpus_format(corpus_dir: str) -> str | None:
    """The corpus's manifest format, or None when it has no manifest."""
    from gopher.data.shards import load_manifest

    if not paths.resolve(corpus_dir).joinpath("manifest.json").is_file():
        return None
    return load_manifest(corpus_dir, complete=False).get("format", "?")


def _mixture_pipeline(model_cfg, train_cfg, data_cfg, workdir, rows, eval_rows, say) -> Pipeline:
    from gopher.data import build
    from gopher.data.build import FORMAT
    from gopher.data.mixture import Mixture

    weights = parse_weights(data_cfg.mixture)  # before a build: a typo should not cost one
    corpus_dir = data_cfg.corpus_dir or default_corpus_dir(model_cfg.vocab_size)
    found = _corpus_format(corpus_dir)
    rebuild = f"`python -m experiments.prepare_data --out={corpus_dir} --vocab_size={model_cfg.vocab_size}`"
    if found is None and data_cfg.corpus_dir:
        raise ValueError(f"corpus {corpus_dir!r} has no manifest.json; build it with {rebuild}")
    if found not in (None, FORMAT) and data_cfg.corpus_dir:
        raise ValueError(
            f"corpus {corpus_dir!r} has format {found!r}, not {FORMAT!r} (its held-out split "
            f"and byte counts are older); rebuild it with {rebuild}"
        )
    if found != FORMAT:
        why = "first run only" if found is None else f"its format {found!r} is not {FORMAT!r}"
        say(f"building the embedded corpus into {corpus_dir} ({why}; a few minutes)")
        build.build_embedded_corpus(corpus_dir, model_cfg.vocab_size, log=say)
    b, t = train_cfg.batch_size, model_cfg.seq_len
    mix = Mixture.from_corpus(
        corpus_dir,
        weights,
        batch_size=b,
        seq_len=t,
        seed=train_cfg.seed,
        # One global stream; `take` is given this process's rows (sharding.local_rows), so
        # the even split by process, which needs B % processes == 0, is never used: a mesh
        # whose model groups span processes only needs B % (replica * data) == 0.
        process_index=0,
        process_count=1,
        vocab_size=model_cfg.vocab_size,
    )
    eval_sets = {}
    for source in mix.names:
        windows = _eval_set(source, *mix.heldout_stream(source), train_cfg, t, say)
        if windows:
            eval_sets[source] = windows
    if not eval_sets:
        raise _no_eval_error(t, corpus_dir)
    unigram = _unigram([s.train for s in mix.sources], eval_sets, mix.tokenizer.vocab_size)
    eval_sets = {
        source: _local_windows(windows, eval_rows) for source, windows in eval_sets.items()
    }
    manifest = mix.manifest or {}
    total = manifest.get("total", {})
    return Pipeline(
        tokenizer=mix.tokenizer,
        next_batch=lambda global_batch, rows: mix.take(global_batch // b, rows),
        state=mix.state,
        restore=mix.restore,
        stats=mix.stats,
        eval_sets=eval_sets,
        unigram_bpb=unigram,
        fingerprint=data_fingerprint(manifest=manifest),
        summary=(
            f"data: embedded corpus {corpus_dir}: {len(mix.names)} sources, "
            f"{total.get('bytes', 0) / 1e6:.1f} MB, {total.get('tokens', 0):,} tokens; weights "
            + ", ".join(f"{n} {w:.2f}" for n, w in mix.weights.items())
            + f"; unigram baseline {unigram:.3f} bits/byte"
        ),
    )


def heldout_documents(
    model_cfg: ModelConfig, data_cfg: DataConfig, workdir: str
) -> dict[str, list[Document]]:
    """Each source's held-out documents with their original text: {source: documents}.

    The documents the in-training eval scores (the same split, the same order), for
    scoring them elsewhere (experiments/evaluate.py). The embedded corpus reads them from
    its held-out shards; stdlib and files recompute the split (config.json's heldout_sha256,
    `check_heldout`, tells whether it is the run's: a glob's split depends on its paths).
    `workdir` is where a run keeps its data (unused by these sources today).
    """
    del workdir
    if data_cfg.source != "embedded":
        return {data_cfg.source: _documents(data_cfg, "heldout")}
    from gopher.data.shards import load_manifest, read_shards

    corpus_dir = data_cfg.corpus_dir or default_corpus_dir(model_cfg.vocab_size)
    if paths.is_remote(corpus_dir):
        raise ValueError(
            f"corpus {corpus_dir!r} is remote; copy it to local disk (gsutil -m cp -r) and "
            "pass --config.data.corpus_dir=LOCAL_DIR to read its held-out documents"
        )
    manifest = load_manifest(corpus_dir)
    out = {}
    for source, entry in sorted(manifest["sources"].items()):
        shards = [os.path.join(corpus_dir, s) for s in entry["heldout"]["shards"]]
        out[source] = list(read_shards(shards))
    return out


def build_pipeline(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    workdir: str,
    rows: tuple[int, int] | None = None,
    say=print,
    eval_rows: tuple[int, int] | None = None,
) -> Pipeline:
    """The configured data; `rows` = [lo, hi): the global batch rows this process feeds
    (default: all of them, one process); `eval_rows`: the same for an eval batch of
    `train_cfg.eval_batch_size` rows."""
    rows = rows or (0, train_cfg.batch_size)
    eval_rows = eval_rows or (0, train_cfg.eval_batch_size)
    if data_cfg.source == "embedded":
        return _mixture_pipeline(model_cfg, train_cfg, data_cfg, workdir, rows, eval_rows, say)
    return _text_pipeline(model_cfg, train_cfg, data_cfg, workdir, rows, eval_rows, say)

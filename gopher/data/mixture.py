"""Mixing sources by proportion into packed [B, T+1] windows, per host, resumable.

Shapes:
    S: number of sources
    B: global batch size (rows per step, all hosts); B_local = B / process_count
    T: sequence length; a row is a window of T + 1 tokens (inputs [:-1], targets [1:])
    W_s: windows in source s's training stream, (N_s - 1) // T

The stream is a pure function of (seed, step, global row):
- Packing. A source's training documents, each followed by EOS, form one flat token
  stream of N_s tokens (written by prepare_data). Window w is tokens[w*T : w*T + T + 1],
  so consecutive windows overlap by one token (gopher/data/packing.py says why): documents
  span windows, windows hold several documents, nothing is padded.
- Epochs. Epoch e of source s visits all W_s windows once, in the order of a seeded
  pseudo-random permutation of [0, W_s) (a Feistel network with cycle walking:
  random access, O(1) memory, any W_s; gopher/data/permutation.py).
- Mixing. Step t's B rows draw their sources i.i.d. with the configured proportions from
  a generator seeded by (seed, t): the share of rows (and so of tokens) of each source
  converges to its weight.
- Row b of step t, of source s, reads source s's next unread window: number
  `consumed_s(t) + (rows of source s before b in step t)` of its window sequence.

A larger training batch (a batch schedule: Gopher 280b's 1536 -> 3072) is k = B' / B
consecutive mixer steps joined (`take(k, rows)`), so the sequences read so far are always
the first ones of the same stream, whatever the schedule; the mixer's `step` counts its
own steps of B rows.

`consumed_s(t)`, the windows of each source the steps before t used, is the whole
state: `{"step": t, "windows": {source: count}}`, global and independent of the host
count. Host h materialises only rows [h * B_local, (h + 1) * B_local) (the contiguous
slice `jax.make_array_from_process_local_data` expects), so 1, 2 or 4 hosts read the
same global batch, and a checkpoint written with 4 hosts resumes with 2.

Why not grain. grain's `MapDataset.mix` mixes by index deterministically, but packing
is an `IterDataset` transform whose checkpoint is the iterator state of one host's
shard (dataset[shard::count]); restoring it under a different host count is not
something grain 0.2 supports. Making packing window-aligned turns every row into a
random-access read of a memory-mapped array, so nothing but the counters above needs
checkpointing, the per-host split is free, and plain numpy slicing is orders of
magnitude faster than a step needs (experiments/bench_data.py) without worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from gopher.data.corpus_files import load_tokenizer, load_tokens
from gopher.data.permutation import feistel_permutation
from gopher.data.proportions import named_weights
from gopher.data.sources import Document
from gopher.data.tokenizer import Tokenizer


class Source(NamedTuple):
    """One source's token streams: train windows to mix, held-out text for bpb."""

    name: str
    train: np.ndarray  # [N_s] int32, documents joined with EOS
    heldout: np.ndarray  # [M_s] int32 (may be empty)
    # [M_s] int32: UTF-8 bytes of the original text per held-out token (EOS 0); None:
    # counted from the pieces (NFKC-normalised text), for corpora without them
    heldout_bytes: np.ndarray | None = None


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


class Mixture:
    """Weighted, packed, per-host, resumable training batches; see the module docstring.

    The training loop calls `next()` once per step (or `batch_at(step)`), saves
    `state()` beside its checkpoint, and calls `restore(state)` on resume; `stats()`
    gives per-source tokens and epochs for logging; `heldout_stream(source)` gives the
    held-out tokens with their original UTF-8 bytes, which `packing.eval_windows` scores.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Mapping[str, float],
        token_byte_lengths: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index, self.process_count = _process_defaults(process_index, process_count)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size {batch_size} and seq_len {seq_len} must be >= 1")
        if batch_size % self.process_count:
            raise ValueError(
                f"global batch_size {batch_size} is not divisible by process_count "
                f"{self.process_count}; use a multiple of {self.process_count}"
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
        by_name = {s.name: s for s in sources}
        unknown = sorted(set(weights) - set(by_name))
        if unknown:
            raise ValueError(
                f"weights name sources {unknown} that are not available; available: "
                f"{sorted(by_name)} (a mixture for another corpus?)"
            )
        if not all(math.isfinite(w) and w >= 0 for w in weights.values()) or not (
            sum(weights.values()) > 0
        ):
            raise ValueError(f"weights {dict(weights)} must be finite, >= 0, with a positive sum")
        self.names = sorted(name for name, w in weights.items() if w > 0)
        total = sum(weights[n] for n in self.names)
        self.weights = {n: weights[n] / total for n in self.names}
        self.sources = [by_name[n] for n in self.names]
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.local_batch_size = batch_size // self.process_count
        lo = self.process_index * self.local_batch_size
        self.row_range = (lo, lo + self.local_batch_size)  # this host's rows; see set_rows
        self.token_byte_lengths = np.asarray(token_byte_lengths, np.int64)
        self.num_windows = np.array([(len(s.train) - 1) // seq_len for s in self.sources])
        empty = [n for n, w in zip(self.names, self.num_windows, strict=True) if w < 1]
        if empty:
            raise ValueError(
                f"sources {empty} have fewer than seq_len + 1 = {seq_len + 1} training tokens; "
                "drop them from the weights or use a shorter seq_len"
            )
        self._cdf = np.cumsum([self.weights[n] for n in self.names])
        self._step = 0
        self._windows = np.zeros(len(self.names), np.int64)
        self._cursor = (0, self._windows.copy())  # a cache for batch_at's fast-forward
        self.tokenizer: Tokenizer | None = None  # set by the constructors that know it
        self.manifest: dict | None = None  # the corpus manifest, from `from_corpus`

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_corpus(
        cls,
        corpus_dir: str,
        weights: Mapping[str, float] | str | None = None,
        batch_size: int = 16,
        seq_len: int = 2048,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        vocab_size: int | None = None,
    ) -> Mixture:
        """A mixture over a corpus built by `python -m experiments.prepare_data`.

        `weights`: None for the corpus's own (manifest), a name from MIXTURES
        (gopher/data/proportions.py), or a dict.
        A name's shares go to the corpus's sources by name or role (`named_weights`; one
        in no role the corpus has is dropped); a dict must name only existing sources.
        `vocab_size`, if given, must match the corpus's tokenizer (the model's vocab).
        """
        from gopher.data.shards import load_manifest

        manifest = load_manifest(corpus_dir)
        corpus_vocab = manifest["tokenizer"]["vocab_size"]
        if vocab_size is not None and vocab_size != corpus_vocab:
            raise ValueError(
                f"corpus {corpus_dir!r} has a {corpus_vocab}-piece tokenizer but the model's "
                f"vocab_size is {vocab_size}; build one with `python -m "
                f"experiments.prepare_data --vocab_size={vocab_size} --out=DIR`"
            )
        if weights is None:
            weights = manifest["weights"]
        elif isinstance(weights, str):
            weights = named_weights(weights, manifest["sources"])
        unknown = sorted(set(weights) - set(manifest["sources"]))
        if unknown:
            skipped = manifest.get("skipped") or []
            raise ValueError(
                f"weights name sources {unknown} that corpus {corpus_dir!r} does not have; "
                f"its sources: {', '.join(sorted(manifest['sources']))}"
                + (f" (skipped when it was built: {', '.join(skipped)})" if skipped else "")
            )
        sources = []
        for name in sorted(weights):
            entry = manifest["sources"][name]
            train, heldout = (
                load_tokens(corpus_dir, entry[s]["tokens_file"], entry[s].get("tokens"))
                for s in ("train", "heldout")
            )
            held_bytes = entry["heldout"].get("bytes_file")
            held_bytes = load_tokens(corpus_dir, held_bytes, len(heldout)) if held_bytes else None
            sources.append(Source(name, train, heldout, held_bytes))
        tokenizer = load_tokenizer(corpus_dir, manifest["tokenizer"])
        mixture = cls(
            sources,
            weights,
            tokenizer.token_byte_lengths(),
            batch_size,
            seq_len,
            seed,
            process_index,
            process_count,
        )
        mixture.tokenizer, mixture.manifest = tokenizer, manifest
        return mixture

    @classmethod
    def from_documents(
        cls,
        tokenizer: Tokenizer,
        documents: Mapping[str, tuple[Sequence[Document], Sequence[Document]]],
        weights: Mapping[str, float],
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> Mixture:
        """A mixture over in-memory documents: {source: (train docs, held-out docs)}."""
        from gopher.data.build import tokenize_stream
        from gopher.data.packing import stream_with_bytes

        sources = [
            Source(
                name, tokenize_stream(tokenizer, train, 1), *stream_with_bytes(tokenizer, held, 1)
            )
            for name, (train, held) in sorted(documents.items())
        ]
        mixture = cls(
            sources,
            weights,
            tokenizer.token_byte_lengths(),
            batch_size,
            seq_len,
            seed,
            process_index,
            process_count,
        )
        mixture.tokenizer = tokenizer
        return mixture

    # --- the stream ---------------------------------------------------------------------

    def sources_at(self, step: int) -> np.ndarray:
        """[B] int: the source index of every global row of `step`."""
        u = np.random.default_rng([self.seed, 0x6D6978, step]).random(self.batch_size)
        return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self.names) - 1)

    def _windows_at(self, step: int) -> np.ndarray:
        """[S] windows of each source used by the steps before `step`."""
        if step < 0:
            raise ValueError(f"step {step} must be >= 0")
        # Replay the source draws from the latest known point at or before `step`.
        known = [
            (0, np.zeros(len(self.names), np.int64)),
            self._cursor,
            (self._step, self._windows),
        ]
        start, windows = max((k for k in known if k[0] <= step), key=lambda k: k[0])
        windows = windows.copy()
        for t in range(start, step):
            windows += np.bincount(self.sources_at(t), minlength=len(self.names))
        self._cursor = (step, windows.copy())
        return windows

    def _rows(self, step: int, windows: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[len(rows), T+1] int32: the windows of the given global rows of `step`."""
        sources = self.sources_at(step)  # [B]
        ordinal = np.zeros(self.batch_size, np.int64)  # the row's window number in its source
        for s in range(len(self.names)):
            mine = np.flatnonzero(sources == s)
            ordinal[mine] = windows[s] + np.arange(len(mine))
        out = np.empty((len(rows), self.seq_len + 1), np.int32)
        offsets = np.arange(self.seq_len + 1)
        for s in np.unique(sources[rows]):
            picked = np.flatnonzero(sources[rows] == s)
            k = ordinal[rows[picked]].astype(np.uint64)
            n = np.uint64(self.num_windows[s])
            epochs, within = k // n, k % n
            window = np.empty(len(k), np.uint64)
            for e in np.unique(epochs):
                at = epochs == e
                window[at] = feistel_permutation(within[at], int(n), (self.seed, int(s), int(e)))
            starts = window.astype(np.int64) * self.seq_len
            out[picked] = self.sources[s].train[starts[:, None] + offsets]
        return out

    def batch_at(self, step: int) -> np.ndarray:
        """[B_local, T+1] int32: this host's rows of `step` (does not change the state).

        Cheap for the state's step and the steps after it; an earlier step replays the
        source draws from step 0 (no token reads), O(step) small generator calls.
        """
        return self._rows(step, self._windows_at(step), self._local_rows())

    def global_batch_at(self, step: int) -> np.ndarray:
        """[B, T+1] int32: every host's rows of `step` (for tests and single-host use)."""
        return self._rows(step, self._windows_at(step), np.arange(self.batch_size))

    def next(self) -> np.ndarray:
        """This host's rows of the current step, then advances the state by one step."""
        return self.take(1, self.row_range)

    def take(self, steps: int, rows: tuple[int, int]) -> np.ndarray:
        """Rows [lo, hi) of the next `steps` steps' global batches joined into one batch of
        steps * B rows ([hi - lo, T+1] int32), then advances the state by `steps` steps:
        one training step of a batch `steps` times this mixer's."""
        lo, hi = rows
        b = self.batch_size
        if not 0 <= lo < hi <= steps * b:
            raise ValueError(f"rows [{lo}, {hi}) outside the batch of {steps} x {b} rows")
        parts = []
        for j in range(steps):
            first, last = max(lo - j * b, 0), min(hi - j * b, b)  # step j's share of the rows
            if first < last:
                parts.append(self._rows(self._step, self._windows, np.arange(first, last)))
            self._advance()
        return np.concatenate(parts)

    def _advance(self) -> None:
        self._windows = self._windows + np.bincount(
            self.sources_at(self._step), minlength=len(self.names)
        )
        self._step += 1

    __next__ = next

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def _local_rows(self) -> np.ndarray:
        return np.arange(*self.row_range)

    def set_rows(self, lo: int, hi: int) -> None:
        """Feeds global rows [lo, hi) instead of the even split by process: the rows the
        mesh's data axis puts on this process's devices (processes that share a data index
        because a model group spans them feed the same rows)."""
        if not 0 <= lo < hi <= self.batch_size:
            raise ValueError(f"rows [{lo}, {hi}) outside the batch of {self.batch_size}")
        self.row_range = (lo, hi)

    # --- state and accounting ---------------------------------------------------------

    def state(self) -> dict:
        """JSON-serialisable: {"step": int, "windows": {source: int}} (global, host-free)."""
        return {
            "step": int(self._step),
            "windows": {n: int(w) for n, w in zip(self.names, self._windows, strict=True)},
        }

    def restore(self, state: Mapping) -> None:
        """Continues the exact stream from `state()` (any process count)."""
        saved = dict(state["windows"])
        if sorted(saved) != self.names:
            raise ValueError(
                f"mixer state has sources {sorted(saved)} but this mixture has {self.names}; "
                "resume with the same corpus and weights"
            )
        self._step = int(state["step"])
        self._windows = np.array([int(saved[n]) for n in self.names], np.int64)
        self._cursor = (self._step, self._windows.copy())

    def stats(self) -> dict[str, float]:
        """Per-source accounting over all hosts: target tokens seen and epochs."""
        out: dict[str, float] = {"data/step": self._step}
        for n, w, total in zip(self.names, self._windows, self.num_windows, strict=True):
            out[f"data/{n}/tokens"] = int(w) * self.seq_len
            out[f"data/{n}/epochs"] = float(w) / float(total)
        return out

    # --- evaluation ---------------------------------------------------------------------

    @property
    def heldout_sources(self) -> list[str]:
        return [s.name for s in self.sources if len(s.heldout) > 1]

    def heldout_stream(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """([M_s] int32 held-out tokens, [M_s] int64 UTF-8 bytes per token) of `source`."""
        by_name = {s.name: s for s in self.sources}
        if source not in by_name:
            raise ValueError(f"unknown source {source!r}; choose from {self.names}")
        src = by_name[source]
        tokens = np.asarray(src.heldout)
        if src.heldout_bytes is None:
            return tokens, self.token_byte_lengths[tokens]
        return tokens, np.asarray(src.heldout_bytes, np.int64)

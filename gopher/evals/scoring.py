"""Log-likelihood scoring with a loaded model: (context, continuation) requests and text.

Everything here reduces to rows: a row is input tokens, the target token after each,
and a mask of the targets that count. Rows of mixed lengths are right-padded into a few
length buckets (powers of two from 16, up to the row's cap) with the padding masked,
stacked into batches whose row count is a multiple of `model.batch_multiple`, placed on
`model.batch_sharding` (rows over the mesh's batch axes, as in training) and scored by
one jitted program per (rows, length) shape: sum of the target NLLs and whether every
target is the greedy argmax, per row. The model is causal, so right padding never
changes the scores of the real tokens; only the [B] sums leave the devices.

Requests. A request is scored as [EOS] + encode(context) + encode(continuation): the EOS
stands for the end of the previous document (training streams join documents with EOS),
so the first context token has a context too. Context and continuation are encoded
*apart* and joined, so the scored tokens are exactly encode(continuation) and decode to
the continuation (as the tokenizer normalises it, NFKC; ASCII is unchanged), the same
tokens whichever context precedes them. Encoding the joined string instead can merge
tokens across the boundary ("a cat " + "sat" joined gives "▁sat"; apart, "▁" + "sat"),
so the continuation's tokens would depend on the context. The space before a word belongs
to the continuation (" sat"), as the tasks put it; a context's trailing whitespace is moved
there (lm-evaluation-harness's rule). Rows longer than the model's seq_len run
at their own length (relative attention has no position table) up to `max_len` (default
4 x seq_len); past it, the first tokens of [EOS] + context are dropped (counted in
`Score.truncated`), as lm-evaluation-harness truncates from the left. A continuation
longer than max_len on its own cannot be scored: `score_requests` raises, or with
`skip_too_long=True` returns None for it (the harness then skips the whole item).

Text (bits per byte). Each document is its own stream s = [EOS] + encode(text) + [EOS]:
every token of the text and the closing EOS is a target (the EOS decodes to 0 bytes).
Windows of L input tokens start every `stride` tokens (default L // 2); the first
window scores all its targets, each later one only the targets after those already
scored, so every target is scored exactly once with at least L - stride tokens of
context (except in the first window), and the last window may be short (padded and
masked). bpb = sum NLL (nats) / (ln 2 * len(text.encode("utf-8"))): the text's own
bytes, not those of the tokenizer's NFKC-normalised pieces. A text that is a document's
first part only (cut to a length: `close=False`) is scored without the closing EOS,
s = [EOS] + encode(text): its end is not the document's, so predicting EOS there would
charge the model for an end that is not in the text.

Single process: the per-row results are read back with np.asarray.

Shape glossary:
  B rows in a batch (a multiple of model.batch_multiple)   L row length (a bucket)
  V vocabulary size   N targets of a document's stream (its tokens, + 1 if closed)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gopher.inference import LoadedModel, pad_rows

MIN_BUCKET = 16


class Row(NamedTuple):
    """One scored sequence: inputs [n] and the target after each [n] (int32), mask [n]."""

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(token) over the continuation's tokens, nats
    num_tokens: int  # the continuation's tokens
    greedy: bool  # every continuation token is the argmax of its prediction
    num_bytes: int  # UTF-8 bytes of the continuation
    truncated: int = 0  # tokens of [EOS] + context dropped to fit max_len
    length: int = 0  # input tokens the row ran at (past seq_len: extrapolated)


@dataclasses.dataclass
class Timings:
    compile_s: float = 0.0  # lowering + XLA compilation, one per batch shape
    run_s: float = 0.0  # device execution, including the host -> device copies
    compiles: int = 0
    rows: int = 0  # real rows scored (padding rows not counted)
    tokens: int = 0  # row positions run, padding included


def bucket_length(n: int, cap: int) -> int:
    """The padded length of a row of n tokens: the next power of two (>= 16), at most cap."""
    if n > cap:
        raise ValueError(f"row of {n} tokens is longer than its cap {cap}")
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), cap)


def request_row(
    context_ids: Sequence[int], continuation_ids: Sequence[int], eos_id: int, max_len: int
) -> tuple[Row, int]:
    """The row of [EOS] + context + continuation (at most max_len inputs), and the number
    of leading tokens dropped to fit."""
    if not continuation_ids:
        raise ValueError("a request's continuation encodes to no tokens; give a non-empty one")
    if len(continuation_ids) > max_len:
        raise ValueError(
            f"a continuation of {len(continuation_ids)} tokens does not fit max_len {max_len}; "
            "raise max_len (evaluate: --max_len) or shorten it"
        )
    seq = np.asarray([eos_id, *context_ids, *continuation_ids], dtype=np.int32)
    dropped = max(0, len(seq) - (max_len + 1))
    seq = seq[dropped:]
    mask = np.zeros(len(seq) - 1, dtype=bool)
    mask[-len(continuation_ids) :] = True
    return Row(seq[:-1], seq[1:], mask), dropped


def stream_windows(
    ids: Sequence[int], eos_id: int, window: int, stride: int, close: bool = True
) -> list[Row]:
    """Rows covering the stream [EOS] + ids + [EOS] (close=False: [EOS] + ids, a cut
    document's): every one of its len(ids) + 1 (len(ids)) targets is unmasked in exactly
    one row, rows hold at most `window` inputs."""
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(
            f"window {window} and stride {stride} need 1 <= stride <= window; "
            "a stride past the window would skip targets"
        )
    tail = [eos_id] if close else []
    s = np.concatenate([[eos_id], np.asarray(ids, dtype=np.int32), tail]).astype(np.int32)
    n = len(s) - 1  # targets s[1:]
    rows, scored, start = [], 0, 0
    while scored < n:
        end = min(start + window, n)  # this window's targets are s[start + 1 : end + 1]
        positions = np.arange(start + 1, end + 1)
        rows.append(Row(s[start:end], s[start + 1 : end + 1], positions > scored))
        scored, start = end, start + stride
    return rows


def _row_sums(apply, params, tokens, targets, mask):
    """tokens, targets [B, L] int32, mask [B, L] bool -> sum NLL [B] fp32, all greedy [B]."""
    logits = apply(params, tokens).astype(jnp.float32)  # [B, L, V]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, log_z - target_logit, 0.0)
    greedy = (jnp.argmax(logits, axis=-1) == targets) | ~mask
    return jnp.sum(nll, axis=1), jnp.all(greedy, axis=1)


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


class Scorer:
    """Scores rows, requests and texts with `model`, compiling once per batch shape.

    batch_size: rows per batch at length seq_len (rounded up to a multiple of
    model.batch_multiple, the devices the batch is split over); longer rows go fewer per
    batch, to about batch_size * seq_len positions, shorter ones no more. A batch never
    holds fewer than batch_multiple rows (one per data shard), so a batch of rows of
    length L holds up to max(batch_size * seq_len, batch_multiple * L) positions: with many
    data devices, rows up to max_len (4 x seq_len by default) pass the first bound, and
    only a lower max_len, not a lower batch_size, bounds them.
    """

    def __init__(
        self,
        model: LoadedModel,
        batch_size: int = 32,
        max_len: int | None = None,
        log: Callable[[str], None] | None = None,
    ):
        seq_len = model.model_cfg.seq_len
        self.max_len = 4 * seq_len if max_len is None else max_len
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1; pass e.g. --batch_size=32")
        if self.max_len < 1:
            raise ValueError(f"max_len {self.max_len} must be >= 1")
        self.model = model
        self.multiple = model.batch_multiple
        self.batch_size = -(-batch_size // self.multiple) * self.multiple
        self.budget = self.batch_size * seq_len  # positions per batch
        self.log = log
        self.timings = Timings()
        self._programs: dict[tuple[int, int], Callable] = {}
        self._fn = jax.jit(lambda p, t, y, m: _row_sums(model.apply, p, t, y, m))

    def _program(self, rows: int, length: int):
        key = (rows, length)
        if key not in self._programs:
            t0 = time.perf_counter()
            sharding = self.model.batch_sharding
            shapes = [
                jax.ShapeDtypeStruct((rows, length), dtype, sharding=sharding)
                for dtype in (jnp.int32, jnp.int32, jnp.bool_)
            ]
            self._programs[key] = self._fn.lower(self.model.params, *shapes).compile()
            self.timings.compile_s += time.perf_counter() - t0
            self.timings.compiles += 1
        return self._programs[key]

    def _rows_per_batch(self, length: int, count: int) -> int:
        full = max(self.multiple, (self.budget // length) // self.multiple * self.multiple)
        full = min(full, self.batch_size)
        if count >= full:
            return full
        # A bucket's last, partial batch: a power of two times the multiple (few shapes).
        rows = self.multiple
        while rows < count:
            rows *= 2
        return min(rows, full)

    def score_rows(self, rows: Sequence[Row], cap: int | None = None) -> tuple[np.ndarray, ...]:
        """(sum NLL [R] float64, target count [R] int64, all greedy [R] bool) of each row.

        cap: the longest bucket (default max_len); rows must not be longer.
        """
        cap = self.max_len if cap is None else cap
        nll = np.zeros(len(rows), dtype=np.float64)
        greedy = np.zeros(len(rows), dtype=bool)
        count = np.array([int(r.mask.sum()) for r in rows], dtype=np.int64)
        buckets: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            buckets.setdefault(bucket_length(len(r.inputs), cap), []).append(i)
        done = 0
        for length in sorted(buckets):
            members = buckets[length]
            start = 0
            while start < len(members):
                b = self._rows_per_batch(length, len(members) - start)
                chunk = members[start : start + b]
                arrays = np.zeros((3, len(chunk), length), dtype=np.int32)
                for j, i in enumerate(chunk):
                    n = len(rows[i].inputs)
                    arrays[0, j, :n] = rows[i].inputs
                    arrays[1, j, :n] = rows[i].targets
                    arrays[2, j, :n] = rows[i].mask
                tokens, targets, mask = (pad_rows(a, b) for a in arrays)
                program = self._program(b, length)
                t0 = time.perf_counter()
                put = [jax.device_put(a, self.model.batch_sharding) for a in (tokens, targets)]
                put.append(jax.device_put(mask.astype(bool), self.model.batch_sharding))
                sums, all_greedy = program(self.model.params, *put)
                nll[chunk] = np.asarray(sums)[: len(chunk)]
                greedy[chunk] = np.asarray(all_greedy)[: len(chunk)]
                self.timings.run_s += time.perf_counter() - t0
                self.timings.tokens += b * length
                start += len(chunk)
                done += len(chunk)
                if self.log:
                    self.log(f"scored {done}/{len(rows)} rows (length {length}, {b} per batch)")
        self.timings.rows += len(rows)
        return nll, count, greedy

    def score_requests(
        self, requests: Sequence[Request], skip_too_long: bool = False
    ) -> list[Score | None]:
        """Log-likelihood of each continuation given its context (see the module docstring).

        A continuation longer than max_len tokens raises ValueError, or with
        `skip_too_long` is not scored: its entry is None."""
        tok = self.model.tokenizer
        if not requests:
            return []
        # A context's trailing whitespace goes to the continuation ("Answer: " + "Paris"
        # is scored as "Answer:" + " Paris"), as lm-evaluation-harness does: the space
        # belongs to the next word's token, as in training text.
        split = [_move_trailing_space(r.context, r.continuation) for r in requests]
        contexts = tok.encode_batch([c for c, _ in split])
        continuations = tok.encode_batch([k for _, k in split])
        built: list[tuple[Row, int] | None] = []
        for c, k in zip(contexts, continuations, strict=True):
            if skip_too_long and len(k) > self.max_len:
                built.append(None)
            else:
                built.append(request_row(c, k, tok.eos_id, self.max_len))
        kept = [i for i, b in enumerate(built) if b is not None]
        nll, count, greedy = self.score_rows([built[i][0] for i in kept])
        scores: list[Score | None] = [None] * len(requests)
        for j, i in enumerate(kept):
            scores[i] = Score(
                logprob=-float(nll[j]),
                num_tokens=int(count[j]),
                greedy=bool(greedy[j]),
                num_bytes=len(split[i][1].encode("utf-8")),  # the scored text
                truncated=built[i][1],
                length=len(built[i][0].inputs),
            )
        return scores

    def continuation_tokens(self, request: Request) -> int:
        """How many tokens the request's scored continuation encodes to (what must fit
        max_len), its context's trailing whitespace moved onto it as `score_requests` does."""
        _, continuation = _move_trailing_space(request.context, request.continuation)
        return len(self.model.tokenizer.encode(continuation))

    def text_nll(
        self,
        texts: Sequence[str],
        window: int,
        stride: int | None = None,
        close: bool | Sequence[bool] = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(sum NLL in nats [D], targets scored [D]) of each text as its own stream.

        close: whether each text (or all) is a whole document, its closing EOS a target;
        False for a document's first part (see the module docstring)."""
        stride = window // 2 if stride is None else stride
        closes = [close] * len(texts) if isinstance(close, bool) else list(close)
        if len(closes) != len(texts):
            raise ValueError(
                f"close has {len(closes)} entries for {len(texts)} texts; give one each"
            )
        tok = self.model.tokenizer
        owners, rows = [], []
        for d, ids in enumerate(tok.encode_batch(list(texts))):
            windows = stream_windows(ids, tok.eos_id, window, stride, closes[d])
            rows.extend(windows)
            owners.extend([d] * len(windows))
        nll, count, _ = self.score_rows(rows, cap=window)
        owners = np.asarray(owners, dtype=np.int64)
        return (
            np.bincount(owners, weights=nll, minlength=len(texts)),
            np.bincount(owners, weights=count, minlength=len(texts)).astype(np.int64),
        )

    def bits_per_byte(
        self, texts: Sequence[str], window: int, stride: int | None = None
    ) -> dict[str, float]:
        """bpb of the texts together, with the totals it is made of."""
        nll, count = self.text_nll(texts, window, stride)
        num_bytes = sum(len(t.encode("utf-8")) for t in texts)
        if num_bytes == 0:
            raise ValueError("the texts hold no bytes; bits per byte needs some text")
        return {
            "bpb": float(nll.sum() / (math.log(2) * num_bytes)),
            "nll_nats": float(nll.sum()),
            "tokens": int(count.sum()),
            "bytes": int(num_bytes),
        }

"""Packing token streams into fixed-size training windows, with no padding.

Shapes:
    B: batch size (windows per batch)
    T: sequence length (tokens the model sees; it predicts T targets per window)
    N: length of the flat token stream (documents joined, each followed by EOS)

Training reads these windows by index: `TokenDataset.batch_at` for text sources, and
`gopher.data.mixture.Mixture` for a built corpus (the same windows, in per-epoch order).
Held-out text is scored by `eval_windows`: the same windows over the whole stream, the
tail padded and masked, each target weighted by the UTF-8 bytes of the original text it
stands for (`stream_with_bytes`, from `Tokenizer.encode_with_bytes`; EOS is 0 bytes).

A window is T + 1 consecutive tokens: inputs are window[:, :-1], targets window[:, 1:].
Consecutive windows overlap by one token (window i starts at i * T). That is the
standard scheme because every token of the stream but the first is a target exactly
once, and no transition between windows is lost; non-overlapping windows of T + 1
would never predict the first token of each window. Documents are not aligned to
windows: a document may span windows, and a window may hold several documents with
EOS between them, which wastes no compute on padding.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence

import numpy as np

from gopher.data.sources import Document
from gopher.data.tokenizer import Tokenizer


def _documents_key(tokenizer: Tokenizer, documents: Sequence[Document]) -> str:
    """A hash of the tokenizer and the documents, naming the token cache file."""
    h = hashlib.sha256(tokenizer.sha256.encode())
    for doc in documents:
        for part in (doc.source, doc.name, doc.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))  # lengths make the encoding unambiguous
            h.update(data)
    return h.hexdigest()[:24]


class TokenDataset:
    """Documents tokenised once into a flat [N] int32 stream with EOS after each document.

    Training batches are a pure function of (seed, step), so resuming needs only the step.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        token_byte_lengths: np.ndarray,
        seed: int = 0,
        num_documents: int | None = None,
    ):
        self.tokens = np.asarray(tokens, dtype=np.int32)  # [N]
        self.token_byte_lengths = np.asarray(token_byte_lengths, dtype=np.int64)  # [V]
        self.seed = seed
        self.num_documents = num_documents

    @classmethod
    def from_documents(
        cls,
        tokenizer: Tokenizer,
        documents: Sequence[Document],
        seed: int = 0,
        cache_dir: str | None = None,
        num_threads: int | None = None,
    ) -> TokenDataset:
        """Tokenises `documents` (or loads the cached tokens from `cache_dir`)."""
        lengths = tokenizer.token_byte_lengths()
        cache_path = None
        if cache_dir is not None:
            key = _documents_key(tokenizer, documents)
            cache_path = os.path.join(cache_dir, f"tokens-{key}.npy")
            if os.path.isfile(cache_path):
                return cls(np.load(cache_path), lengths, seed, len(documents))
        eos = np.array([tokenizer.eos_id], dtype=np.int32)
        parts: list[np.ndarray] = []
        # Encode in slices so peak memory stays near the token array, not Python lists.
        for i in range(0, len(documents), 1024):
            texts = [d.text for d in documents[i : i + 1024]]
            for ids in tokenizer.encode_batch_numpy(texts, num_threads=num_threads):
                parts.extend((ids.astype(np.int32, copy=False), eos))
        tokens = np.concatenate(parts) if parts else np.zeros([0], np.int32)  # [N]
        if cache_path is not None:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache_path}.tmp{os.getpid()}.npy"
            np.save(tmp, tokens)
            os.replace(tmp, cache_path)  # atomic: a concurrent reader never sees half a file
        return cls(tokens, lengths, seed, len(documents))

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of (normalised) text the whole stream decodes to."""
        return int(self.token_byte_lengths[self.tokens].sum())

    def num_windows(self, seq_len: int) -> int:
        """Windows of T + 1 tokens starting at multiples of T that fit in the stream."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def _windows(self, window_index: np.ndarray, seq_len: int) -> np.ndarray:
        starts = window_index.astype(np.int64) * seq_len  # [B]
        return self.tokens[starts[:, None] + np.arange(seq_len + 1)]  # [B, T+1]

    def batch_at(self, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """[B, T+1] int32 training batch for `step`: windows at random window-aligned starts.

        Drawn from default_rng([seed, step]) with replacement, so any step can be made
        without making the steps before it.
        """
        num_windows = self.num_windows(seq_len)
        if num_windows < 1:
            raise ValueError(
                f"{self.num_tokens} tokens cannot fill one window of seq_len {seq_len} + 1; "
                "use more data or a shorter seq_len"
            )
        rng = np.random.default_rng([self.seed, step])
        return self._windows(rng.integers(0, num_windows, size=batch_size), seq_len)


def stream_with_bytes(
    tokenizer: Tokenizer, documents: Sequence[Document], num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """([N] int32 tokens, [N] int32 bytes): the documents joined, each followed by EOS,
    and each token's UTF-8 bytes of the original text (EOS 0), summing to the texts'."""
    eos = np.array([tokenizer.eos_id], np.int32)
    zero = np.zeros([1], np.int32)
    tokens: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for i in range(0, len(documents), 256):
        texts = [d.text for d in documents[i : i + 256]]
        for ids, n in tokenizer.encode_batch_with_bytes(texts, num_threads=num_threads):
            tokens.extend((ids, eos))
            lengths.extend((n, zero))
    if not tokens:
        return np.zeros([0], np.int32), np.zeros([0], np.int32)
    return np.concatenate(tokens), np.concatenate(lengths)


def eval_windows(
    tokens: np.ndarray,
    target_bytes: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yields ([B, T+1] int32 windows, [B, T] bool target mask, UTF-8 bytes of the
    unmasked targets), covering the stream in order: window i is tokens[i*T : i*T+T+1].

    The last window and batch are padded (token 0, mask False), so a stream shorter than
    one window is still scored and no target is dropped; masked targets count nothing.
    `max_batches` caps the batches (the first ones).
    """
    tokens = np.asarray(tokens, np.int32)
    target_bytes = np.asarray(target_bytes, np.int64)
    if tokens.shape != target_bytes.shape:
        raise ValueError(
            f"tokens {tokens.shape} and target_bytes {target_bytes.shape} differ; pass the "
            "byte counts of the same stream (stream_with_bytes)"
        )
    targets = max(0, len(tokens) - 1)
    num_windows = -(-targets // seq_len)
    num_batches = -(-num_windows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    span = batch_size * seq_len
    for k in range(num_batches):
        window = np.zeros(span + 1, np.int32)
        weight = np.zeros(span + 1, np.int64)
        piece = tokens[k * span : (k + 1) * span + 1]
        window[: len(piece)] = piece
        weight[: len(piece)] = target_bytes[k * span : (k + 1) * span + 1]
        mask = np.zeros(span + 1, bool)
        mask[1 : len(piece)] = True  # the first token of the stream is never a target
        index = np.arange(batch_size)[:, None] * seq_len + np.arange(seq_len + 1)  # [B, T+1]
        targets_mask = mask[index[:, 1:]]  # [B, T]
        yield window[index], targets_mask, int(weight[index[:, 1:]][targets_mask].sum())

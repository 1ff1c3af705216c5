"""SentencePiece tokenizer with byte fallback, trained in-process and reproducibly.

Shapes: V is the vocabulary size (`Tokenizer.vocab_size`).

The settings suit code as well as prose: whitespace is kept exactly (no collapsing of
runs of spaces, no dummy prefix space), runs of spaces may become single pieces
(indentation), newlines are learned inside pieces (training sentences are multi-line
chunks), digits are split one per piece, and any character the model never saw is
encoded as its UTF-8 bytes, so nothing maps to <unk>.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from gopher import paths

PAD_ID, UNK_ID, BOS_ID, EOS_ID = -1, 0, 1, 2
_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def _chunks(text: str, max_bytes: int) -> Iterator[str]:
    """Splits text into pieces of at most max_bytes UTF-8 bytes, at line breaks if possible.

    SentencePiece skips training sentences longer than max_sentence_length, so long
    documents are cut here, deterministically, rather than silently dropped there.
    """
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if current and size + n > max_bytes:
            yield "".join(current)
            current, size = [], 0
        if n > max_bytes:
            # One over-long line: cut it at character boundaries.
            piece: list[str] = []
            piece_size = 0
            for ch in line:
                m = len(ch.encode("utf-8"))
                if piece_size + m > max_bytes:
                    yield "".join(piece)
                    piece, piece_size = [], 0
                piece.append(ch)
                piece_size += m
            line, n = "".join(piece), piece_size
        current.append(line)
        size += n
    if current:
        yield "".join(current)


def training_sample(texts: Iterable[str], sample_bytes: int, max_sentence_bytes: int) -> list[str]:
    """A deterministic sample of training sentences of about sample_bytes in total.

    Takes every k-th chunk of the whole corpus rather than its first chunks, so the sample
    covers every document kind even when the input is sorted by name.
    """
    return _sample(texts, sample_bytes, max_sentence_bytes)[0]


def _sample(texts: Iterable[str], sample_bytes: int, max_sentence_bytes: int):
    """(`training_sample`, the UTF-8 bytes of all the text it was drawn from)."""
    chunks = [c for t in texts for c in _chunks(t, max_sentence_bytes) if c.strip()]
    total = sum(len(c.encode("utf-8")) for c in chunks)
    stride = max(1, -(-total // max(1, sample_bytes)))  # ceil(total / sample_bytes)
    return chunks[::stride], total


class TrainingError(ValueError):
    """SentencePiece could not train at this vocab_size on this text; the message says
    what to change. `with_flags` names the knobs as the caller's flags."""

    def __init__(self, vocab_size, sample_size, total, reason, most=None, least=None):
        self.vocab_size, self.sample_size, self.total = vocab_size, sample_size, total
        self.reason, self.most, self.least = reason, most, least
        super().__init__(self.with_flags())

    def with_flags(self, vocab: str = "vocab_size", sample: str = "sample_bytes") -> str:
        if self.least is not None:
            return (
                f"{vocab}={self.vocab_size} is below the {self.least} pieces this text's "
                f"characters need; raise {vocab} to {self.least} or more"
            )
        if self.most is not None:
            found = (
                f"{vocab}={self.vocab_size} is more pieces than SentencePiece finds in "
                f"{self.sample_size:,} bytes of text (at most {self.most})"
            )
            lower = f"lower {vocab} to {self.most} or less"
            if self.total > self.sample_size:  # the text has more: a bigger sample helps
                return (
                    f"{found}; raise {sample} (the sample is {self.sample_size:,} of the "
                    f"text's {self.total:,} bytes) or {lower}"
                )
            return f"{found}; {lower}, or give more text"
        return (
            f"SentencePiece training with {vocab}={self.vocab_size} on {self.sample_size:,} "
            f"bytes failed: {self.reason}; check {vocab} and the text"
        )


class Tokenizer:
    """A SentencePiece model with ids: <unk>=0, <s>=1 (unused), </s>=2 (EOS), no pad id."""

    def __init__(self, model_bytes: bytes, path: str = "<memory>"):
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError:
            raise ValueError(
                f"tokenizer model {path!r} is not a SentencePiece model (damaged or another "
                "kind of file); replace it with a good copy, or delete it and rerun training, "
                "which trains it again from the data"
            ) from None
        self._model_bytes = model_bytes
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._token_byte_lengths: np.ndarray | None = None

    def __reduce__(self):
        # Picklable (for data-loader worker processes) by shipping the model bytes.
        return (Tokenizer, (self._model_bytes, self.path))

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Loads a model file written by `Tokenizer.train` (or any SentencePiece model)."""
        file = paths.resolve(path)
        if not file.is_file():
            raise ValueError(
                f"tokenizer model {path!r} does not exist; train one with Tokenizer.train "
                "or fix the path"
            )
        return cls(file.read_bytes(), path)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        path: str,
        *,
        model_type: str = "unigram",
        sample_bytes: int = 4_000_000,
        max_sentence_bytes: int = 2048,
        num_threads: int = 1,
    ) -> Tokenizer:
        """Trains a model on a deterministic sample of `texts`, writes it to `path`.

        The same texts and arguments give a byte-identical model file. `num_threads` is
        part of that promise: SentencePiece's result depends on how it splits the work,
        so it is a fixed argument, never the machine's core count. Training a 4096-piece
        unigram model on the default 4 MB sample takes about 8 s on one core.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type {model_type!r} is not 'unigram' or 'bpe'")
        sample, total = _sample(texts, sample_bytes, max_sentence_bytes)
        if not sample:
            raise ValueError("no training text for the tokenizer; check the data sources")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                byte_fallback=True,
                normalization_rule_name="nfkc",
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                remove_extra_whitespaces=False,
                # No dummy "▁" before each text: it would add a byte the text lacks and
                # break sum(token_byte_lengths) == len(text.encode()).
                add_dummy_prefix=False,
                max_sentence_length=max_sentence_bytes,
                input_sentence_size=0,  # we sampled already; let SentencePiece use it all
                shuffle_input_sentence=False,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as e:
            sample_size = sum(len(s.encode("utf-8")) for s in sample)
            reason = str(e).splitlines()[-1] if str(e) else type(e).__name__
            most = re.search(r"too high \(\d+\)\. Please set it to a value <= (\d+)", reason)
            least = re.search(r"smaller than required_chars\. \d+ vs (\d+)", reason)
            raise TrainingError(
                vocab_size,
                sample_size,
                total,
                reason,
                most=int(most.group(1)) if most else None,
                least=int(least.group(1)) if least else None,
            ) from None
        model_bytes = model.getvalue()
        paths.write_atomic(path, model_bytes)  # readers never see a half-written model
        return cls(model_bytes, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encodes many texts at once on `num_threads` threads (default: all cores)."""
        return self._sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def encode_batch_numpy(
        self, texts: Sequence[str], num_threads: int | None = None
    ) -> list[np.ndarray]:
        """Like `encode_batch` but each result is an int32 array: far less memory."""
        threads = num_threads or os.cpu_count() or 1
        return self._sp.encode(list(texts), return_type="numpy", num_threads=threads)

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n] int32, bytes_per_token [n] int32): each token's share of the UTF-8
        bytes of the original `text` (before NFKC), so the shares sum to len(text.encode()).

        From SentencePiece's proto pieces, whose `begin`/`end` are byte offsets into the
        input: pieces of one input character that NFKC expanded ("½" -> "1⁄2") or that
        byte fallback split take the character's bytes on one piece and 0 on the others.
        """
        ((ids, lengths),) = self.encode_batch_with_bytes([text], num_threads=1)
        return ids, lengths

    def encode_batch_with_bytes(
        self, texts: Sequence[str], num_threads: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`encode_with_bytes` for many texts on `num_threads` threads (default: all cores)."""
        from sentencepiece import sentencepiece_pb2

        threads = num_threads or os.cpu_count() or 1
        protos = self._sp.encode(list(texts), out_type="serialized_proto", num_threads=threads)
        out = []
        for text, blob in zip(texts, protos, strict=True):
            pieces = sentencepiece_pb2.SentencePieceText.FromString(blob).pieces
            n = len(pieces)
            ids = np.fromiter((p.id for p in pieces), np.int32, count=n)
            ends = np.fromiter((p.end for p in pieces), np.int64, count=n)  # [n]
            # Bytes up to each piece's end, minus up to the previous one's: gaps (input
            # the normaliser dropped) go to the next piece, so the total is exact.
            ends = np.maximum.accumulate(ends) if n else ends
            lengths = np.diff(ends, prepend=0).astype(np.int32)
            total = len(text.encode("utf-8", "surrogatepass"))
            if n and ends[-1] != total:
                lengths[-1] += total - ends[-1]
            out.append((ids, lengths))
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_byte_lengths(self) -> np.ndarray:
        """[V] int32: UTF-8 bytes each piece decodes to, so bytes = lengths[ids].sum().

        "▁" is one space byte; a byte-fallback piece <0xNN> is one byte; control pieces
        (<s>, </s>) and <unk> (never produced, thanks to byte fallback) count zero. Bytes
        are of the NFKC-normalised text, which for ASCII is the text itself.
        """
        if self._token_byte_lengths is None:
            sp = self._sp
            lengths = np.zeros(self.vocab_size, dtype=np.int32)
            for i in range(self.vocab_size):
                if sp.is_control(i) or sp.is_unknown(i):
                    continue
                if sp.is_byte(i):
                    lengths[i] = 1
                else:
                    lengths[i] = len(sp.id_to_piece(i).replace(_SPACE, " ").encode("utf-8"))
            self._token_byte_lengths = lengths
        return self._token_byte_lengths.copy()

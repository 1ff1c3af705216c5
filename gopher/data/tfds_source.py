"""Text from any TFDS dataset prepared on disk (c4, wikipedia, pg19, ...), without TensorFlow.

TFDS datasets written in the array_record format are read with random access through
`tfds.data_source`, which needs neither TensorFlow nor a registered builder class: the
dataset's directory (data_dir/NAME[/CONFIG]/VERSION with dataset_info.json) is enough.
Datasets in the older tfrecord format need TensorFlow to read; convert them once with
`tfds build --file_format=array_record` on a machine that has it.

    docs = TfdsText("c4/en:3.1.0", "train", data_dir="~/tensorflow_datasets")
    len(docs), docs[0]            # Document(source="c4", name="c4/en:3.1.0/train/0", text=...)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

from gopher.data.sources import Document


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            "tensorflow-datasets is not installed; install the data extra: pip install -e '.[data]'"
        ) from None
    return tfds


class TfdsText:
    """Random access to one split of a TFDS text dataset as `Document`s."""

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | None = None,
        text_key: str = "text",
        source: str | None = None,
    ):
        tfds = _tfds()
        data_dir = os.path.expanduser(data_dir) if data_dir else None
        try:
            self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # TFDS raises several kinds for a missing or bad dataset
            raise ValueError(
                f"cannot open TFDS dataset {name!r} split {split!r} under data_dir {data_dir!r} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); prepare it "
                "with `tfds build --file_format=array_record` or fix --tfds_data_dir"
            ) from None
        self.name, self.split, self.text_key = name, split, text_key
        self.source = source or name.split("/")[0].split(":")[0]
        self.invalid_utf8 = 0  # documents read whose bytes were not UTF-8 (U+FFFD put in)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> Document:
        example = self._data[index]
        if self.text_key not in example:
            raise ValueError(
                f"TFDS {self.name!r} has features {sorted(example)}, not {self.text_key!r}; "
                "set --tfds_text_key"
            )
        text = example[self.text_key]
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:  # kept, with U+FFFD for the bad bytes, and counted
                text = text.decode("utf-8", errors="replace")
                self.invalid_utf8 += 1
        return Document(self.source, f"{self.name}/{self.split}/{index}", str(text))

    def __iter__(self) -> Iterator[Document]:
        for i in range(len(self)):
            yield self[i]


def tfds_documents(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    text_key: str = "text",
    source: str | None = None,
    max_documents: int | None = None,
) -> tuple[list[Document], dict]:
    """(the first `max_documents` documents of the split, a provenance record)."""
    data = TfdsText(name, split, data_dir, text_key, source)
    count = len(data) if max_documents is None else min(len(data), max_documents)
    docs = [data[i] for i in range(count)]
    if data.invalid_utf8:
        print(
            f"warning: TFDS {name!r} split {split!r}: {data.invalid_utf8} of {count} documents "
            "had invalid UTF-8; read with U+FFFD in place of the bad bytes",
            file=sys.stderr,
            flush=True,
        )
    record = {
        "kind": "tfds",
        "name": name,
        "version": name.split(":")[1] if ":" in name else "",
        "split": split,
        "sha256": "",
        "license": "see the dataset's TFDS catalogue page",
        "documents_read": count,
        "documents_available": len(data),
        "documents_invalid_utf8": data.invalid_utf8,
    }
    return docs, record

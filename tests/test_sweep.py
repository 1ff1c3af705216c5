"""The sweep: its plan in closed form, and a smoke sweep killed mid-run and resumed."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import sweep_eval
from experiments import sweep_lib as sweep
from experiments.configs import sweep as sweep_configs
from gopher import metrics
from gopher.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=experiments/configs/sweep.py:smoke"


def test_cpu_plan_budgets_warmup_and_lr_rule():
    cfg = sweep_configs.get_config("cpu")
    runs = sweep.plan_runs(cfg)
    sizes = {r.size: r for r in runs}
    assert len(sizes) >= 5
    params = [r.params for r in sizes.values()]
    assert max(params) / min(params) >= 30  # the acceptance's span, with embeddings
    for r in runs:
        size = next(s for s in cfg.sizes if s.name == r.size)
        model = ModelConfig(
            size.num_layers,
            size.num_heads,
            size.key_size,
            size.d_model,
            vocab_size=cfg.vocab_size,
            seq_len=cfg.seq_len,
        )
        d, layers, v = size.d_model, size.num_layers, cfg.vocab_size
        assert r.params == 13 * d * d * layers + v * d
        assert r.nonembedding_params == 13 * d * d * layers
        per_token = 6 * r.params + 12 * layers * size.num_heads * size.key_size * cfg.seq_len
        assert per_token == metrics.flops_per_token(model)
        batch_tokens = cfg.batch_size * cfg.seq_len
        budget = next(b for b in cfg.budgets if b.name == r.budget)
        if budget.tokens:
            assert r.steps == math.ceil(budget.tokens / batch_tokens)
        else:  # the fewest steps whose FLOPs reach the budget
            assert r.steps == math.ceil(budget.flops / (per_token * batch_tokens))
            assert r.flops >= budget.flops > r.flops - per_token * batch_tokens
        assert r.tokens == r.steps * batch_tokens
        assert r.warmup_steps <= 0.05 * r.steps  # the acceptance's bound, for any length
        assert r.warmup_steps >= 1 or r.steps < 20
        assert r.max_lr == pytest.approx(1e-3 * math.sqrt(256 / d))
        assert dict(r.overrides)["train.steps"] == r.steps


def test_tpu_plan_is_the_table():
    from gopher.config import TRAIN_TOKENS, get_preset

    runs = sweep.plan_runs(sweep_configs.get_config("tpu"))
    assert [r.size for r in runs] == ["44m", "117m", "417m", "1.4b", "7.1b"]
    for r in runs:
        row = get_preset(r.size)
        o = dict(r.overrides)
        assert o["train.batch_size"] == row.batch_size and r.max_lr == row.max_lr
        assert r.warmup_steps == 1500 and "train.precision" not in o  # the row's
        assert TRAIN_TOKENS <= r.tokens < TRAIN_TOKENS + row.batch_tokens
        assert o["parallel.data"] * o["parallel.model"] == 2048  # a v3-2048 pod's cores


def test_bad_budget_and_warmup_are_one_line_errors():
    cfg = sweep_configs.get_config("smoke")
    cfg.warmup_fraction = 0.2
    with pytest.raises(ValueError, match="warmup_fraction = 0.2"):
        sweep.plan_runs(cfg)
    cfg = sweep_configs.get_config("smoke")
    cfg.budgets[0].flops = 1e9
    with pytest.raises(ValueError, match="exactly one of tokens and flops"):
        sweep.plan_runs(cfg)


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", GOPHER_TEST_STEP_SLEEP_S="0.15")
    env.pop("XLA_FLAGS", None)
    return env


def _sweep(workdir, *extra, wait=True):
    cmd = [sys.executable, "-m", "experiments.sweep", SMOKE, f"--workdir={workdir}"]
    cmd += [] if "--report_only" in extra else ["--no_report"]
    proc = subprocess.Popen(
        [*cmd, *extra],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        return out
    return proc


def _records(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _result(workdir, name):
    with open(os.path.join(workdir, "runs", name, sweep_eval.RESULT_FILE)) as f:
        return json.load(f)


def _wait_until_dead(lock_path, timeout_s=60.0):
    """Until the lock's holder (the SIGKILLed trainer, which may still be exiting) is gone."""
    from gopher import workdir as workdir_lib

    if not os.path.exists(lock_path):
        return
    with open(lock_path) as f:
        pid = int(json.load(f)["pid"])
    deadline = time.time() + timeout_s
    while workdir_lib._pid_alive(pid):
        assert time.time() < deadline, f"the killed trainer pid {pid} is still alive"
        time.sleep(0.05)


def test_repeats_are_checked_under_the_mixture_the_runs_train_on(tmp_path):
    """Epochs per source = run tokens x its weight share / its training tokens (a corpus
    of two sources, 1,000 and 4,000 tokens), against max_epochs 4; a data.mixture override
    in the sweep's overrides changes the shares."""
    import types

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    manifest = {
        "weights": {"a": 0.5, "b": 0.5},
        "sources": {"a": {"train": {"tokens": 1000}}, "b": {"train": {"tokens": 4000}}},
    }
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    base = "experiments/configs/gopher.py:tiny"  # source=embedded

    def cfg(*overrides):
        overrides = (("data.corpus_dir", str(corpus)), *overrides)
        return types.SimpleNamespace(
            base=base, variant="cpu", vocab_size=4096, overrides=overrides, max_epochs=4.0
        )

    def runs(tokens):
        return [types.SimpleNamespace(name=f"r{tokens}", tokens=tokens, skip=False)]

    said = []
    sweep.check_repeats(cfg(), runs(6000), said.append)  # a: 6000 * 0.5 / 1000 = 3.0
    assert said == ["most repeated source: a 3.00 epochs in r6000 (max 4.0)"]
    with pytest.raises(ValueError, match=r"run r10000 would read source 'a' 5\.0 times"):
        sweep.check_repeats(cfg(), runs(10000), said.append)
    # a=0.1, b=0.9: a 10000 * 0.1 / 1000 = 1.0, b 10000 * 0.9 / 4000 = 2.25
    sweep.check_repeats(cfg(("data.mixture", "a=0.1,b=0.9")), runs(10000), said.append)
    assert said[-1] == "most repeated source: b 2.25 epochs in r10000 (max 4.0)"


def test_smoke_sweep_killed_mid_run_resumes_to_the_same_result(tmp_path):
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    _sweep(reference, "--only=t2_s20")
    proc = _sweep(killed, wait=False)
    t1 = os.path.join(killed, "runs", "t1_s20")
    t2_metrics = os.path.join(killed, "runs", "t2_s20", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in _records(t2_metrics) if r.get("kind") == "train"]
        if steps and steps[-1] >= 10:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its trainer, with no warning
    proc.wait()
    _wait_until_dead(os.path.join(killed, "runs", "t2_s20", "lock.json"))
    assert not os.path.exists(os.path.join(killed, "runs", "t2_s20", sweep_eval.RESULT_FILE))
    done = [r["step"] for r in _records(t2_metrics) if r.get("kind") == "train"]
    assert done and max(done) < 20, f"the kill did not land mid-run: {done}"
    t1_files = {n: os.stat(os.path.join(t1, n)).st_mtime_ns for n in os.listdir(t1)}
    t1_result = _result(killed, "t1_s20")

    out = _sweep(killed)
    assert "t1_s20: training" not in out  # finished runs are not redone
    assert {n: os.stat(os.path.join(t1, n)).st_mtime_ns for n in os.listdir(t1)} == t1_files
    assert _result(killed, "t1_s20") == t1_result
    got, want = _result(killed, "t2_s20"), _result(reference, "t2_s20")
    assert got["step"] == want["step"] == 20
    assert got["doc_losses"] == want["doc_losses"]  # every held-out document, bit for bit
    assert got["heldout_bpb"] == want["heldout_bpb"]
    curve = lambda r: dict(zip(r["train_log"]["steps"], r["train_log"]["loss"], strict=True))  # noqa: E731
    assert curve(got) == curve(want)
    # and a third run does nothing
    out = _sweep(killed)
    assert "training" not in out and "evaluating" not in out

    results = str(tmp_path / "results")
    _sweep(killed, "--report_only", f"--results_dir={results}")
    with open(os.path.join(results, "summary.json")) as f:
        summary = json.load(f)
    assert summary["runs"] == summary["planned"] == 2
    ordered = [_result(killed, n)["heldout_bpb"] for n in ("t1_s20", "t2_s20")]
    assert summary["token_matched_monotone"] == (ordered[0] > ordered[1])
    alpha = summary["alpha_nonembedding_params"]
    assert alpha["low"] <= alpha["point"] <= alpha["high"]
    with open(os.path.join(results, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["heldout_bpb"]) for r in rows] == ordered
    for name in ("loss_vs_params.png", "loss_vs_flops.png", "source_bpb.png", "curves.png"):
        with open(os.path.join(results, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

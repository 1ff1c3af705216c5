"""The sweep: its plan in closed form, and a smoke sweep killed mid-run and resumed."""

from __future__ import annotations

import csv
import dataclasses
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
    from gopher import workdir_lock

    if not os.path.exists(lock_path):
        return
    with open(lock_path) as f:
        pid = int(json.load(f)["pid"])
    deadline = time.time() + timeout_s
    while workdir_lock._pid_alive(pid):
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

    # A changed eval setting: t1 is evaluated again, not trained (its trainer is not even
    # started); t2, left out by --only, keeps its stale result and is named as not reported.
    train_log = os.stat(os.path.join(t1, "train.log")).st_mtime_ns
    out = _sweep(killed, "--only=t1_s20", "--config.eval.doc_bytes=1024")
    assert "t1_s20: training" not in out and "t1_s20: evaluating" in out, out
    assert "t2_s20: its result is not reported (its evaluation settings changed" in out, out
    assert os.stat(os.path.join(t1, "train.log")).st_mtime_ns == train_log
    docs = _result(killed, "t1_s20")["doc_losses"]
    assert max(d[3] for d in docs) <= 1024 < max(d[3] for d in t1_result["doc_losses"])


# ------------------------------------------------ what each run trains, keeps and is named


# config_flags loads a config file with importlib's deprecated load_module.
_CONFIG_FILE_WARNING = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _trainer_configs(cfg, tmp_path, monkeypatch):
    """Each run's configs as experiments.train builds them from the command line that
    train_run starts it with (absl + config_flags parse it, then common.configs_from_dict),
    with the trainer itself replaced by a process that exits 0 at once."""
    from absl import flags
    from ml_collections import config_flags

    from experiments import common

    started = []

    class Trainer:  # subprocess.Popen's part that train_run uses
        def __init__(self, args, **kwargs):
            started.append(args)

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(sweep.subprocess, "Popen", Trainer)
    out = []
    for run in sweep.plan_runs(cfg):
        sweep.train_run(cfg, run, str(tmp_path / run.name), sweep.Child(), lambda m: None)
        args = started[-1]
        assert args[1:3] == ["-m", "experiments.train"]
        argv = ["train", *args[3:]]
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
        flags.DEFINE_string("workdir", None, "", flag_values=values)
        values(argv)
        out.append((run, common.configs_from_dict(values.config)))
    return out


@_CONFIG_FILE_WARNING
def test_tpu_runs_train_the_table_rows(tmp_path, monkeypatch):
    """The trainer started for each `tpu` run builds the row's model and recipe: its shape,
    max LR, batch, clip norm and precision (get_preset), for the run's steps."""
    from gopher.config import get_preset

    built = _trainer_configs(sweep_configs.get_config("tpu"), tmp_path, monkeypatch)
    assert [run.size for run, _ in built] == ["44m", "117m", "417m", "1.4b", "7.1b"]
    for run, (model, train, _, parallel) in built:
        row = get_preset(run.size)
        for field in ("num_layers", "num_heads", "key_size", "d_model", "vocab_size", "seq_len"):
            assert getattr(model, field) == getattr(row, field), (run.name, field)
        assert train.max_lr == row.max_lr and train.batch_size == row.batch_size
        assert train.clip_norm == row.clip_norm and train.precision == row.precision, run.name
        assert train.steps == run.steps and train.warmup_steps == run.warmup_steps
        assert parallel.data * parallel.model == 2048


@_CONFIG_FILE_WARNING
def test_cpu_runs_train_their_sizes(tmp_path, monkeypatch):
    cfg = sweep_configs.get_config("cpu")
    for run, (model, train, _, _) in _trainer_configs(cfg, tmp_path, monkeypatch):
        size = next(s for s in cfg.sizes if s.name == run.size)
        for field in ("num_layers", "num_heads", "key_size", "d_model"):
            assert getattr(model, field) == getattr(size, field), (run.name, field)
        assert (model.vocab_size, model.seq_len) == (cfg.vocab_size, cfg.seq_len)
        assert train.max_lr == run.max_lr and train.steps == run.steps
        assert train.batch_size == cfg.batch_size and train.precision == cfg.precision


_BASE = """from experiments.configs import gopher


def get_config(preset="tiny"):
    cfg = gopher.get_config(preset)
    cfg.train.optimizer = {optimizer!r}
    cfg.train.weight_decay = {weight_decay!r}
    return cfg
"""


def test_a_result_is_stale_once_the_recipe_or_the_eval_changes(tmp_path):
    """A result is kept for the same base config, overrides and eval settings; a changed
    base recipe (Chinchilla's AdamW with weight decay) or eval limit makes it stale."""
    base = tmp_path / "base.py"

    def plan(optimizer="adam", weight_decay=0.0, limit=200):
        base.write_text(_BASE.format(optimizer=optimizer, weight_decay=weight_decay))
        cfg = sweep_configs.get_config("cpu")
        cfg.base = f"{base}:tiny"
        cfg.eval.limit = limit
        return sweep.plan_runs(cfg)[0]

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = plan()
    current = {"digest": run.digest(), "eval_method": sweep_eval.EVAL_METHOD}
    sweep_eval.write_json(str(run_dir / sweep_eval.RESULT_FILE), current)
    assert sweep_eval.read_result(run, str(run_dir)) is not None
    assert sweep_eval.read_result(plan(limit=1000), str(run_dir)) is None
    assert sweep_eval.read_result(plan(optimizer="adamw", weight_decay=0.1), str(run_dir)) is None
    assert sweep_eval.read_result(plan(), str(run_dir)) is not None  # as it was: kept


def test_a_changed_eval_is_told_apart_from_a_changed_recipe(tmp_path):
    """A result made for the same training but other eval settings is only evaluated
    again (EVAL_CHANGED); another recipe goes back to the trainer (TRAIN_CHANGED); a result
    from before results carried these digests is UNKEYED. One made with the same settings
    by another EVAL_METHOD (before cut documents lost their closing EOS target: none
    recorded) is evaluated again too."""
    base = tmp_path / "base.py"

    def plan(optimizer="adam", weight_decay=0.0, limit=200):
        base.write_text(_BASE.format(optimizer=optimizer, weight_decay=weight_decay))
        cfg = sweep_configs.get_config("cpu")
        cfg.base, cfg.eval.limit = f"{base}:tiny", limit
        return sweep.plan_runs(cfg)[0]

    run, path = plan(), tmp_path / sweep_eval.RESULT_FILE
    before = {"digest": run.digest(), "train_digest": run.train_digest}
    sweep_eval.write_json(str(path), before)  # no eval_method: scored the old way
    assert sweep_eval.read_result(run, str(tmp_path)) is None
    assert sweep_eval.stale_reason(run, str(tmp_path)) == sweep_eval.EVAL_CHANGED
    sweep_eval.write_json(str(path), {**before, "eval_method": sweep_eval.EVAL_METHOD})
    assert sweep_eval.stale_reason(run, str(tmp_path)) == ""
    assert sweep_eval.stale_reason(plan(limit=0), str(tmp_path)) == sweep_eval.EVAL_CHANGED
    changed = plan(optimizer="adamw", weight_decay=0.1)
    assert sweep_eval.stale_reason(changed, str(tmp_path)) == sweep_eval.TRAIN_CHANGED
    sweep_eval.write_json(str(path), {"digest": "before the config was hashed"})
    assert sweep_eval.stale_reason(run, str(tmp_path)) == sweep_eval.UNKEYED


# ---- how a run is evaluated: held-out documents cut to eval.doc_bytes, the task counts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from gopher.data.sources import stdlib_documents
    from gopher.data.tokenizer import Tokenizer

    docs = stdlib_documents("train", 0.05)[:200]
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return Tokenizer.train([d.text for d in docs], 512, path, sample_bytes=100_000)


def _bigram_scorer(tokenizer, table, max_len=None):
    """A bigram table (row a: logits of the token after a) as the `test` preset's model on
    8 data devices: its scores have a closed form."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from gopher import sharding
    from gopher.config import ParallelConfig, get_preset
    from gopher.evals.scoring import Scorer
    from gopher.inference import LoadedModel

    mesh = sharding.make_mesh(ParallelConfig(data=8))
    params = jax.device_put(table, NamedSharding(mesh, P()))
    model = LoadedModel(get_preset("test"), params, lambda p, t: p[t], tokenizer, mesh)
    return Scorer(model, batch_size=8, max_len=max_len)


def _cut_oracle(text: str, limit: int) -> tuple[str, bool]:
    """By brute force: the longest prefix within `limit` UTF-8 bytes that ends a word (a
    non-space followed by a space), else the longest prefix within it."""
    if not limit or len(text.encode()) <= limit:
        return text, True
    fits = [j for j in range(len(text) + 1) if len(text[:j].encode()) <= limit]
    ends = [
        j for j in fits if 0 < j < len(text) and text[j].isspace() and not text[j - 1].isspace()
    ]
    return text[: max(ends or fits)], False


def test_a_cut_document_ends_at_a_word():
    """eval.doc_bytes cuts a document before the last whitespace that fits, never mid-word
    (the model would be scored on a word's first piece), and never mid-character."""
    texts = [
        "h\u00e9llo w\u00f6rld  again\tand\u00a0more\n\nend.",
        "\u00e9\u00e9\u00e9\u00e9\u00e9 x",  # no whitespace within the first bytes
        "   leading",
        "\u65e5\u672c\u8a9e\u306e \u30c6\u30ad\u30b9\u30c8",
        "nowhitespaceatall",
    ]
    for text in texts:
        for limit in range(len(text.encode()) + 2):
            assert sweep_eval.cut_document(text, limit) == _cut_oracle(text, limit), (text, limit)
    assert sweep_eval.cut_document("the cat sat", 9) == ("the cat", False)  # not "the cat s"


def test_cut_documents_are_scored_without_their_eos(tokenizer):
    """The sweep's held-out loss of each document is the bigram's closed form over
    [EOS] + its kept tokens, + the closing EOS only if it was not cut, in non-overlapping
    windows of seq_len; its bytes are the kept text's."""
    import numpy as np

    from gopher.config import DataConfig, get_preset
    from gopher.data.pipeline import heldout_documents

    # heldout_fraction as the tokenizer's: one stdlib split per process (~3 s each)
    cfg, data = get_preset("test"), DataConfig(source="stdlib", heldout_fraction=0.05)
    held = sweep_eval.heldout_texts(cfg, data, "", docs=3, doc_bytes=300)
    originals = heldout_documents(cfg, data, "")
    for source, group in held.items():
        for (text, whole), doc in zip(group, originals[source][:3], strict=True):
            assert (text, whole) == _cut_oracle(doc.text, 300)
    texts = {**held, "whole": [("A short document, whole.", True)]}
    assert {w for group in texts.values() for _, w in group} == {True, False}

    table = np.random.default_rng(0).normal(0, 2.0, (512, 512)).astype(np.float32)
    x = table.astype(np.float64)
    lp = x - np.log(np.exp(x).sum(1, keepdims=True))  # row a: log p(next | a)
    eos = tokenizer.eos_id
    want = []
    for source, group in texts.items():
        for text, whole in group:
            s = [eos, *tokenizer.encode(text), *([eos] if whole else [])]
            nll = -sum(lp[a, b] for a, b in zip(s[:-1], s[1:], strict=False))
            want.append([source, nll, len(s) - 1, len(text.encode())])
    assert max(w[2] for w in want) > 64  # several windows
    got = sweep_eval.score_heldout(_bigram_scorer(tokenizer, table), texts, window=64)
    for g, w in zip(got["doc_losses"], want, strict=True):
        assert g[0] == w[0] and g[2:] == w[2:], (g, w)
        assert g[1] == pytest.approx(w[1], rel=1e-5), (g, w)
    nll, nbytes = sum(w[1] for w in want), sum(w[3] for w in want)
    assert got["heldout_bpb"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-5)
    assert got["heldout_tokens"] == sum(w[2] for w in want) and got["heldout_bytes"] == nbytes


def test_task_results_keep_what_max_len_skipped_cut_or_extrapolated(tokenizer, tmp_path):
    """The sweep's task result keeps the harness's skipped_items, truncated_requests and
    extrapolated_requests (counted here from the requests' token lengths)."""
    import numpy as np

    seq_len, max_len = 64, 100
    mid = "word"
    while len(tokenizer.encode(mid + " end")) <= seq_len:
        mid += " word"
    items = [
        ("The sky is", [" blue", " green"]),
        ("Water is", [" wet", " and then" * 60]),  # a continuation past max_len: skipped
        ("word " * 200 + "word", [" end", " stop"]),  # past max_len: truncated
        (mid, [" end", " stop"]),  # past seq_len: extrapolated
    ]
    path = tmp_path / "items.jsonl"
    path.write_text(
        "".join(json.dumps({"context": c, "continuations": k, "gold": 0}) + "\n" for c, k in items)
    )
    lengths = [[(len(tokenizer.encode(c)), len(tokenizer.encode(x))) for x in k] for c, k in items]
    kept = [ls for ls in lengths if all(n <= max_len for _, n in ls)]
    rows = [c + n for ls in kept for c, n in ls]  # input tokens: [EOS] + context + cont - 1
    want = {
        "items": len(kept),
        "skipped_items": len(items) - len(kept),
        "truncated_requests": sum(r > max_len for r in rows),
        "extrapolated_requests": sum(min(r, max_len) > seq_len for r in rows),
    }
    assert all(want.values()) and want["extrapolated_requests"] > want["truncated_requests"]
    table = np.random.default_rng(1).normal(0, 2.0, (512, 512)).astype(np.float32)
    scorer = _bigram_scorer(tokenizer, table, max_len=max_len)
    (got,) = sweep_eval.evaluate_tasks(scorer, f"file:{path}", 0).values()
    assert {k: got[k] for k in want} == want
    assert set(got) == set(sweep_eval.TASK_KEYS)


def _names(cfg):
    return [r.name for r in sweep.plan_runs(cfg)]


def _committed_names(variant):
    with open(os.path.join(ROOT, "results", f"sweep_{variant}", "results.csv")) as f:
        return [row["name"] for row in csv.DictReader(f)]


def test_run_names_do_not_depend_on_how_many_seeds_or_settings():
    """Adding seeds keeps every finished run's name (and so its directory and result), and
    the committed reports' runs keep theirs."""
    from experiments.configs import precision

    for get in (lambda: sweep_configs.get_config("cpu"), precision.get_config):
        one, more = get(), get()
        one.seeds, more.seeds = (0,), (0, 1, 2)
        seed0 = [r.name for r in sweep.plan_runs(more) if r.seed == 0]
        assert seed0 == _names(one)
        assert len(set(_names(more))) == len(_names(more))
    assert _names(sweep_configs.get_config("cpu")) == _committed_names("cpu")
    assert _names(precision.get_config()) == _committed_names("precision")


def test_a_second_token_budget_is_refused():
    """The report fits one token-matched L(N): a second token budget would be pooled into
    it, the larger sizes trained on more tokens inflating alpha."""
    cfg = sweep_configs.get_config("cpu")
    cfg.budgets.append(type(cfg.budgets[0])(dict(name="tok8m", tokens=8 * 2**20, flops=0.0)))
    with pytest.raises(ValueError, match="tok2m.*tok8m"):
        sweep.plan_runs(cfg)


def test_a_warmup_over_5_percent_of_a_run_is_refused():
    """Gopher's 1,500 warm-up steps (warmup_fraction 0) are more than 5% of a CPU run; of
    a `tpu` run (1.1M+ steps) they are not."""
    cfg = sweep_configs.get_config("cpu")
    cfg.warmup_fraction = 0.0
    with pytest.raises(ValueError, match="warmup_fraction"):
        sweep.plan_runs(cfg)
    for r in sweep.plan_runs(sweep_configs.get_config("tpu")):
        assert r.warmup_steps == 1500 <= 0.05 * r.steps


def _fake_result(run, i):
    """A result file's content for a run that was never trained (the report reads these)."""
    docs = [["web", 100.0 + 10 * k - 5 * i, 30, 400 + k] for k in range(8)]
    nll = sum(d[1] for d in docs)
    bpb = nll / (math.log(2) * sum(d[3] for d in docs))
    return {
        **{k: v for k, v in dataclasses.asdict(run).items() if k not in ("overrides", "skip")},
        "digest": run.digest(),
        "eval_method": sweep_eval.EVAL_METHOD,
        "step": run.steps,
        "heldout_bpb": bpb,
        "heldout_loss": nll / sum(d[2] for d in docs),
        "bpb_by_source": {"web": bpb},
        "doc_losses": docs,
        "tasks": {},
        "train_log": {
            "steps": [10, 20],
            "loss": [5.0, 4.0],
            "eval_steps": [20],
            "eval_bpb": [bpb],
            "train_s": 1.0,
        },
    }


def test_only_reports_the_whole_sweep(tmp_path):
    """--only trains and evaluates the named runs; the report holds every finished run,
    and a figure the new report does not draw is not left beside it."""
    workdir, results = tmp_path / "work", tmp_path / "results"
    for i, run in enumerate(sweep.plan_runs(sweep_configs.get_config("smoke"))):
        (workdir / "runs" / run.name).mkdir(parents=True)
        sweep_eval.write_json(
            str(workdir / "runs" / run.name / sweep_eval.RESULT_FILE), _fake_result(run, i)
        )
    results.mkdir()
    (results / "isoflop.png").write_bytes(b"a compute-matched group's, from another sitting")
    cmd = [sys.executable, "-m", "experiments.sweep", SMOKE, f"--workdir={workdir}"]
    out = subprocess.run(
        [*cmd, f"--results_dir={results}", "--only=t2_s20"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "training" not in out.stdout  # both have results
    with open(results / "results.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == ["t1_s20", "t2_s20"]
    with open(results / "summary.json") as f:
        assert json.load(f)["runs"] == 2
    assert not (results / "isoflop.png").exists()


def test_a_failed_run_exits_with_its_trainers_status(tmp_path):
    """The trainer refuses a bad value (exit 2, bad input): the sweep exits 2 with the
    trainer's line, not 3 (diverged)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sweep",
            SMOKE,
            f"--workdir={tmp_path}",
            "--config.precision=fp64",
            "--no_report",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "fp64" in line and "(exit 2)" in line


@pytest.mark.parametrize("code, status", [(4, 4), (5, 5), (7, 7), (-9, 137)])
def test_a_failed_trainers_status_is_the_sweeps(tmp_path, monkeypatch, code, status):
    """4 (no checkpoint restored), 5 (workdir locked: retry), 7 (storage: rerun as it is)
    reach a wrapper unchanged; a trainer killed by SIGKILL is 128 + 9, as a shell says."""

    class Trainer:
        def __init__(self, args, stdout, **kwargs):
            stdout.write("error: the trainer's reason\n")

        def wait(self):
            return code

    monkeypatch.setattr(sweep.subprocess, "Popen", Trainer)
    run = sweep.plan_runs(sweep_configs.get_config("smoke"))[0]
    with pytest.raises(sweep.RunFailed, match="the trainer's reason") as failed:
        sweep.train_run(None, run, str(tmp_path), sweep.Child(), lambda m: None)
    assert failed.value.code == status


def test_a_null_loss_in_the_log_is_read_back_as_nan(tmp_path):
    """metrics.jsonl writes a non-finite number as null (strict JSON); the sweep's curves
    read it as NaN again, a number matplotlib and the fits skip, and keep the steps."""
    lines = [
        {"kind": "train", "step": 10, "loss": 5.0, "step_time_s": 0.5},
        {"kind": "train", "step": 20, "loss": None, "step_time_s": 0.5},
        {"kind": "eval", "step": 20, "heldout_bpb": None},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    log = sweep_eval._train_records(str(tmp_path))
    assert log["steps"] == [10, 20] and log["loss"][0] == 5.0 and math.isnan(log["loss"][1])
    assert log["eval_steps"] == [20] and math.isnan(log["eval_bpb"][0])
    assert log["train_s"] == 10 * 0.5 + 10 * 0.5

"""The command-line entry points, run as real subprocesses."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_model_table_json_matches_closed_form_quickly():
    start = time.time()
    out = _run("experiments.model_table", "--format=json")
    elapsed = time.time() - start
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert list(rows) == ["44m", "117m", "417m", "1.4b", "7.1b", "280b"]
    for r in rows.values():
        formula = 13 * r["d_model"] ** 2 * r["layers"] + 32000 * r["d_model"]
        assert abs(r["params"] - formula) / formula < 1e-3
        assert {"name", "layers", "heads", "key_size", "d_model", "params"} <= set(r)
    batches = {n: (r["batch_size"], r["batch_schedule"], r["precision"]) for n, r in rows.items()}
    assert batches == {
        "44m": (128, [], "mixed"),
        "117m": (128, [], "mixed"),
        "417m": (128, [], "mixed"),
        "1.4b": (128, [], "mixed"),
        "7.1b": (1024, [], "bf16_sr"),
        "280b": (1536, [[47_684, 3072]], "bf16_sr"),
    }
    assert elapsed < 30
    table = _run("experiments.model_table").stdout
    assert "| 1,536 -> 3,072 after step 47,684 |" in table and "| bf16_sr |" in table


def test_train_cli_writes_metrics_and_beats_unigram(tmp_path):
    workdir = tmp_path / "run"
    out = _run(
        "experiments.train",
        "--config=experiments/configs/gopher.py:test",
        "--config.train.steps=100",
        "--config.train.eval_every=50",
        "--config.train.batch_size=8",
        "--config.train.profile_steps=(3,4)",
        f"--workdir={workdir}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    evals = [x for x in lines if x["kind"] == "eval"]
    for rec in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(rec)
    assert train[-1]["step"] == 100 and train[-1]["loss"] < train[0]["loss"]
    assert [e["step"] for e in evals] == [50, 100]
    assert evals[-1]["heldout_bpb"] < evals[-1]["heldout_unigram_bpb"]
    assert (workdir / "tokenizer.model").is_file() and (workdir / "config.json").is_file()
    assert any((workdir / "tensorboard").iterdir())  # TensorBoard event files
    assert any(p.is_file() for p in (workdir / "profile").rglob("*"))  # the jax.profiler trace
    assert all(r["mfu"] > 0 for r in train[1:]) and "mfu_causal" in train[-1]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config=experiments/configs/gopher.py:45m", "unknown preset '45m'"),
        ("--config.model.key_size=7", "num_heads * key_size"),
        ("--config.train.precision=fp8", "TrainConfig.precision = 'fp8'"),
        ("--config.model.n_layer=3", "unknown config field in --config.model.n_layer=3;"),
        (
            "--config.data.source=embedded --config.data.mixture=books=1,code=-1",
            "(negative: code); fix --config.data.mixture",
        ),
        # 8 devices (tests/conftest.py): the field to fix is the eval batch's
        ("--config.train.eval_batch_size=4", "; use --config.train.eval_batch_size=8"),
    ],
)
def test_bad_config_is_one_line_naming_the_value(tmp_path, flag, message):
    args = ["--config=experiments/configs/gopher.py:test", *flag.split(), f"--workdir={tmp_path}"]
    out = _run("experiments.train", *args, timeout=120)
    assert out.returncode != 0
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert any(message in line for line in err), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_tools_report_background_errors_once_and_drop_closed_event_loop_noise():
    """What the tools' hooks (train's main thread, background_errors.quiet shared with
    evaluate and sample) print for exceptions raised where no one catches them: a
    finalizer calling into a closed asyncio loop (tensorstore after a failed restore)
    prints nothing, another finalizer's error one warning, an uncaught one an error."""
    code = (
        "import asyncio\n"
        "from experiments import train\n"
        "from gopher import background_errors\n"
        "train.quiet_main_thread()\n"
        "background_errors.quiet()\n"
        "loop = asyncio.new_event_loop()\n"
        "loop.close()\n"
        "class Late:\n"
        "    def __del__(self):\n"
        "        loop.call_soon_threadsafe(print)\n"
        "class Broken:\n"
        "    def __del__(self):\n"
        "        raise KeyError('x')\n"
        "Late(); Late(); Broken(); Broken()\n"
        "raise ZeroDivisionError('boom')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "warning: ignored in background: KeyError: 'x'",
        "error: uncaught ZeroDivisionError (a bug; rerun with --verbose for the traceback): boom",
    ], out.stderr

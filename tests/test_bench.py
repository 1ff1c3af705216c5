"""experiments/bench.py and its PyTorch peer, benchmarks/peers/gpt2_torch.py.

experiments.bench registers absl flags (--verbose, --preset, ...) when imported, which
other CLIs imported in-process by the suite define too; so its functions are called in a
short subprocess here (it imports in about 0.1 s) and never imported into this one.
The peer needs torch, which the test venv lacks: those tests run only with torch in this
interpreter or a peer interpreter in $GOPHER_PEER_PYTHON, and skip otherwise.
"""

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(ROOT, "benchmarks", "peers", "gpt2_torch.py")
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def run_python(code: str, *args):
    """Runs `code` in a short subprocess with `args` as JSON in sys.argv[1]; returns the
    JSON its last line prints."""
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _call(snippet: str, *args):
    """Runs `snippet` with `bench`, `bench_machine` and `bench_peer` imported and `args`
    bound; returns its `out` as JSON."""
    return run_python(
        "import json, sys\nfrom experiments import bench, bench_machine, bench_peer\n"
        "args = json.loads(sys.argv[1])\n"
        f"try:\n    out = {snippet}\nexcept ValueError as e:\n    out = {{'error': str(e)}}\n"
        "print(json.dumps(out))",
        *args,
    )


def _bench(*flags, timeout=300):
    cmd = [sys.executable, "-m", "experiments.bench", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_summarise_ratios_medians_and_the_faster_peer_mode():
    rounds = [
        {"gopher": 900.0, "peer_eager": 600.0, "peer_compile": 750.0},
        {"gopher": 1000.0, "peer_eager": 640.0, "peer_compile": None},  # compile failed
        {"gopher": 950.0, "peer_eager": 700.0, "peer_compile": 500.0},
    ]
    s = _call("bench_peer.summarise(args[0])", rounds)
    # By hand: each round's peer is its faster mode; ratio = gopher / that.
    assert [(r["peer"], r["peer_mode"]) for r in s["rounds"]] == [
        (750.0, "compile"),
        (640.0, "eager"),
        (700.0, "eager"),
    ]
    want = [900 / 750, 1000 / 640, 950 / 700]
    assert [r["ratio"] for r in s["rounds"]] == pytest.approx(want)
    assert s["ratio_median"] == pytest.approx(950 / 700)
    assert (s["ratio_min"], s["ratio_max"]) == pytest.approx((1.2, 1.5625))
    assert s["gopher_tokens_per_sec"] == 950.0
    # Medians over rounds: eager 640, compiled (750 + 500) / 2 = 625 -> eager is the figure.
    assert s["peer_eager_tokens_per_sec"] == 640.0
    assert s["peer_compile_tokens_per_sec"] == 625.0
    assert (s["peer_tokens_per_sec"], s["peer_mode"]) == (640.0, "eager")


def test_a_sitting_is_one_line_beside_the_record():
    rounds = [{"gopher": 900.0, "peer_eager": 800.0, "peer_compile": 1000.0}]
    line = _call(
        "bench_peer.sitting_line({'summary': dict(bench_peer.summarise(args[0]), "
        "peak_rss_gib={'gopher': 2.0}), 'machine': {'cpu': 'Xeon', 'cores': 2, 'jax': '0.10.2', "
        "'torch': '2.13.0'}, 'time': 't', 'git': 'abc', 'shape': 'nanogpt', 'command': 'c'})",
        rounds,
    )
    assert (line["gopher_tokens_per_sec"], line["peer_mode"], line["rounds"]) == (900, "compile", 1)
    assert line["ratio_median"] == line["ratio_min"] == line["ratio_max"] == 0.9
    assert (line["cpu"], line["git"], line["peak_rss_gib"]) == ("Xeon", "abc", {"gopher": 2.0})
    path = _call("bench_peer.sittings_path(args[0])", "benchmarks/bench_nanogpt_peer.json")
    assert path == "benchmarks/bench_nanogpt_peer_sittings.jsonl"


def test_summarise_refuses_rounds_without_figures():
    assert "pass --rounds=1" in _call("bench_peer.summarise(args[0])", [])["error"]
    bad = [{"gopher": 900.0, "peer_eager": None, "peer_compile": None}]
    assert "without a peer figure" in _call("bench_peer.summarise(args[0])", bad)["error"]


LSCPU = """\
Architecture:                            x86_64
CPU(s):                                  4
Vendor ID:                               AuthenticAMD
Model name:                              AMD EPYC 7B13 64-Core Processor
Thread(s) per core:                      2
Flags:                                   fpu vme sse sse2 avx fma avx2 bmi2 sha_ni
"""
CPUINFO = """\
processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_machine_record_parses_lscpu_and_cpuinfo_text():
    amd, intel = _call("[bench_machine.parse_cpu_info(t) for t in args]", LSCPU, CPUINFO)
    assert amd["cpu"] == "AMD EPYC 7B13 64-Core Processor"
    assert amd["flags"] == {
        "avx2": True,
        "fma": True,
        "avx512f": False,
        "avx512_bf16": False,
        "amx_bf16": False,
        "amx_tile": False,
    }
    assert intel["cpu"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert all(intel["flags"].values())
    # "avx512f" must be a whole flag: "avx512fp16"-like names alone do not count.
    assert not _call("bench_machine.parse_cpu_info(args[0])", "Flags: avx512fp16 amx_bf16x")[
        "flags"
    ]["avx512f"]


def test_nanogpt_shape_model_flops_match_the_closed_form_and_the_peer():
    got = _call(
        "(lambda n, m, t: {'dims': [m.num_layers, m.num_heads, m.key_size, m.d_model, "
        "m.vocab_size, m.seq_len, t.batch_size], 'flops': "
        "__import__('gopher.metrics').metrics.flops_per_token(m)})(*bench.configs('nanogpt'))"
    )
    assert got["dims"] == [8, 16, 32, 512, 32000, 512, 8]
    # Gopher Table 1's 44m row: N = 13 d^2 L + V d; per token 6 N + 12 L H Q T.
    n = 13 * 512**2 * 8 + 32000 * 512
    assert n == 43_646_976
    assert got["flops"] == 6 * n + 12 * 8 * 16 * 32 * 512 == 287_047_680
    # The peer's default shape is the same (read from its source: torch is not needed).
    with open(PEER) as f:
        tree = ast.parse(f.read())
    shapes = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SHAPES"
    )
    layers, heads, d_model, vocab, seq, batch = shapes["nanogpt"]
    assert [layers, heads, d_model // heads, d_model, vocab, seq, batch] == got["dims"]


def test_single_run_test_preset_prints_and_appends_the_record(tmp_path):
    out = tmp_path / "speed.jsonl"
    args = ["--preset=test", "--steps=1", "--warmup=0", "--peak_gflops=50", f"--out={out}"]
    args += ["--attention=xla", f"--profile={tmp_path / 'trace'}"]
    proc = _bench(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(proc.stdout.splitlines()[-1])
    saved = json.loads(out.read_text().splitlines()[-1])
    assert saved["command"] == "python -m experiments.bench " + " ".join(args)
    assert {k: saved[k] for k in rec} == rec
    assert (rec["preset"], rec["batch"], rec["seq_len"], rec["steps"]) == ("test", 8, 64, 1)
    assert rec["tokens_per_sec"] == pytest.approx(8 * 64 / rec["step_time_s"], rel=1e-3)
    # test preset: L 2, H 4, Q 16, d 64, V 512, T 64.
    flops = 6 * (13 * 64**2 * 2 + 512 * 64) + 12 * 2 * 4 * 16 * 64
    assert rec["flops_per_token"] == flops
    assert (rec["peak_flops"], rec["peak_flops_source"]) == (50e9, "--peak_gflops")
    assert rec["mfu"] == pytest.approx(rec["tokens_per_sec"] * flops / 50e9, abs=1e-4)
    # One step from the init: the loss is that of a near-uniform guess over 512 tokens.
    assert abs(rec["loss"] - math.log(512)) < 0.3
    assert 0.05 < rec["peak_rss_gib"] < 16
    m = rec["machine"]
    assert m["cores"] == os.cpu_count() and m["cpu"] and m["torch"] is None
    assert set(m["flags"]) >= {"avx512f", "amx_bf16"} and m["jax"] and m["jaxlib"]
    assert rec["compile_s"] > 0 and rec["step_cpu_s"] >= 0
    assert rec["attention"] == "xla" and rec["device_peak_gib"] is None  # no memory_stats on CPU
    assert 0 < rec["temp_gib"] < 1
    # The traced steps' XLA CPU thunks, summed by name (experiments.trace_summary).
    profile = rec["profile"]
    assert profile["busy_ms"] > 0 and profile["kernels"] and "XLA" in profile["source"]
    assert sum(f["ms"] for f in profile["families"].values()) == pytest.approx(profile["busy_ms"])


def test_mesh_run_matches_one_device_and_splits_its_work():
    """--mesh jits the step over a data x model mesh as training does. The oracle is the
    one-device run of the same step: the same first loss, and the compiled program's
    matmul FLOPs per device x 4 devices equal to the one device's (work split, not
    repeated); the model axis brings all-reduces, ZeRO-1 the parameters' all-gathers."""
    common = ["--preset=test", "--steps=1", "--warmup=0", "--peak_gflops=50", "--out="]
    # XLA's attention and dots on both: the one-device step's CPU kernels are custom calls,
    # whose matmuls cost_analysis() does not count.
    common.append("--attention=xla")
    runs = {}
    for key, extra in [("one", []), ("mesh", ["--mesh=2,2", "--zero=1"])]:
        proc = _bench(*common, *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[key] = json.loads(proc.stdout.splitlines()[-1])
    one, mesh = runs["one"], runs["mesh"]
    assert (one["mesh"], one["devices"]) == (None, "1x cpu")
    assert (mesh["mesh"], mesh["zero"], mesh["devices"]) == ([2, 2], 1, "4x cpu")
    assert mesh["loss"] == pytest.approx(one["loss"], rel=1e-4)
    dots = mesh["compiled"]["dot_flops_per_device"] * 4
    assert dots == pytest.approx(one["compiled"]["dot_flops_per_device"], rel=0.05)
    assert one["compiled"]["collectives"] == {}
    ops = mesh["compiled"]["collectives"]
    assert ops["all-reduce"]["runs"] > 0 and ops["all-gather"]["runs"] > 0
    # Simulated devices share the host: the peak is not multiplied by their count.
    assert mesh["peak_flops"] == 50e9


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--shape=nanogpt", "--preset=tiny"], ["--shape=nanogpt", "--preset=tiny"]),
        (["--preset=test", "--steps=0"], ["--steps=0", "--steps>=1"]),
        (
            ["--preset=test", "--peer=torch", "--peer_python=/nonexistent/python"],
            ["--peer_python=/nonexistent/python cannot be run"],
        ),
        (
            ["--preset=test", "--peer=torch", "--precision=mixed"],
            ["--precision=mixed", "--precision=fp32"],
        ),
        (["--preset=test", "--peer=torch", "--rounds=0"], ["--rounds=0"]),
        (["--preset=test", "--peer=torch", "--warmup=0"], ["--warmup=0"]),
        (["--preset=test", "--mesh=4"], ["--mesh='4'", "D,M"]),
        (["--preset=test", "--zero=1"], ["--zero=1", "--mesh=D,M"]),
        (["--preset=test", "--peer=torch", "--mesh=2,1"], ["--peer", "drop --mesh"]),
        (["--preset=test", "--peer=torch", "--profile=/tmp/p"], ["--profile=/tmp/p", "--peer"]),
        (["--preset=test", "--batch=0"], ["--batch=0", "positive --batch"]),
        (["--preset=test", "--seq_len=0"], ["--seq_len=0", "positive --seq_len"]),
        (["--preset=test", "--peak_gflops=-1"], ["--peak_gflops=-1.0", "positive"]),
    ],
)
def test_bad_flags_are_one_line(flags, needles):
    _one_line_error(_bench(*flags), *needles)


def test_one_round_runs_both_sides_in_one_environment_with_gopher_flags_passed_on():
    # What each subprocess is started with, the runs replaced by a recorder: gopher's
    # environment and the peer's two, and gopher's --attention and --unroll_layers on its
    # command line (not dropped by --peer).
    seen = run_python(
        """
import json
from experiments import bench, bench_machine, bench_peer
seen = []
def fake(cmd, env, what):
    seen.append([what, cmd, env.get("GLIBC_TUNABLES"), env == bench_machine.timing_env()])
    fast = "huge" in env.get("GLIBC_TUNABLES", "") and "eager" in what
    return {"tokens_per_sec": 2.0 if fast else 1.0, "mfu": None, "peak_rss_gib": 1.0,
            "peak_flops": 1e9, "flops_per_token": 1.0, "first_step_s": 0.0}
bench_peer.run_json = fake
name, model_cfg, train_cfg = bench.configs(preset="test")
opts = bench_peer.PeerOptions(attention="xla", unroll_layers="no")
g, env, p, _ = bench_peer._commands(opts, name, model_cfg, train_cfg, 1, 1, "python")
r = bench_peer._one_round("1/1", g, env, p, None, "/tmp", lambda line: None)
print(json.dumps([seen, {k: v.get("env") for k, v in r.items() if k != "gopher"}]))
"""
    )
    seen, kept = seen
    assert [what for what, *_ in seen] == [
        "gopher",
        "torch eager (plain malloc)",
        "torch eager (hugetlb malloc)",
        "torch compile (plain malloc)",
        "torch compile (hugetlb malloc)",
    ]
    # gopher with huge-page malloc, as `make bench`; the peer with and without, the faster
    # kept (here eager was faster with it and compile without).
    tunables = [t for _, _, t, _ in seen]
    assert tunables == ["glibc.malloc.hugetlb=1"] + ["", "glibc.malloc.hugetlb=1"] * 2
    assert seen[0][3] and kept == {
        "peer_eager": "hugetlb",
        "peer_eager_other": "plain",
        "peer_compile": "plain",
        "peer_compile_other": "hugetlb",
    }
    gopher_cmd = seen[0][1]
    assert "--attention=xla" in gopher_cmd and "--unroll_layers=no" in gopher_cmd


def test_peer_without_torch_says_how_to_install_it():
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here")
    _one_line_error(_bench("--preset=test", "--peer=torch"), "pip install -e '.[bench]'")
    proc = _bench("--preset=test", "--peer=torch", f"--peer_python={sys.executable}")
    _one_line_error(proc, f"--peer_python={sys.executable} cannot import torch")


def _peer_python():
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    python = os.environ.get("GOPHER_PEER_PYTHON")
    if not python:
        pytest.skip("torch is not installed (pip install -e '.[bench]' or set GOPHER_PEER_PYTHON)")
    return python


def test_peer_tiny_step_counts_and_initial_loss():
    dims = dict(layers=2, heads=4, d_model=64, vocab=512, seq=32, batch=2)
    cmd = [_peer_python(), PEER, *(f"--{k}={v}" for k, v in dims.items())]
    proc = subprocess.run(
        [*cmd, "--steps=2", "--warmup=1", "--threads=1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(proc.stdout.splitlines()[-1])
    layers, d, vocab, seq = dims["layers"], dims["d_model"], dims["vocab"], dims["seq"]
    # GPT-2 without biases, tied: 12 d^2 per block, token and position tables, 2L+1 norm scales.
    assert rec["params"] == 12 * d * d * layers + vocab * d + seq * d + (2 * layers + 1) * d
    assert rec["matmul_params"] == 12 * d * d * layers + vocab * d
    assert rec["flops_per_token"] == 6 * rec["matmul_params"] + 12 * layers * 4 * 16 * seq
    # N(0, 0.02) weights: logits have std 0.02 sqrt(d) = 0.16, so the loss is ~ln V.
    assert abs(rec["loss_first"] - math.log(vocab)) < 0.1
    assert rec["loss"] < rec["loss_first"]  # AdamW at 6e-4 on one fixed batch
    assert rec["tokens_per_sec"] == pytest.approx(2 * 32 / rec["step_time_s"], rel=1e-2)
    assert (rec["mode"], rec["threads"], rec["peak_rss_gib"] > 0) == ("eager", 1, True)
    bad = subprocess.run([*cmd, "--heads=3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--d_model=64 is not a multiple of --heads=3" in bad.stderr


@pytest.mark.slow
def test_side_by_side_end_to_end(tmp_path):
    out = tmp_path / "peer.json"
    flags = ["--preset=test", "--peer=torch", f"--peer_python={_peer_python()}"]
    proc = _bench(*flags, "--rounds=1", "--steps=1", "--warmup=1", f"--peer_out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    (r,) = rec["rounds"]
    # gopher with huge-page malloc; each peer mode with and without it, the faster kept.
    assert r["gopher"]["glibc_tunables"] == "glibc.malloc.hugetlb=1"
    for mode in ("peer_eager", "peer_compile"):
        envs = {r[mode]["env"], r[f"{mode}_other"]["env"]}
        assert envs == {"plain", "hugetlb"}
        assert r[mode]["tokens_per_sec"] >= r[f"{mode}_other"].get("tokens_per_sec", 0)
    best = max(r["peer_eager"]["tokens_per_sec"], r["peer_compile"].get("tokens_per_sec", 0))
    assert rec["summary"]["ratio_median"] == pytest.approx(r["gopher"]["tokens_per_sec"] / best)
    assert rec["machine"]["torch"] and rec["command"].startswith("python -m experiments.bench")
    assert "gopher/torch: median" in proc.stdout
    (line,) = (tmp_path / "peer_sittings.jsonl").read_text().splitlines()
    assert json.loads(line)["ratio_median"] == rec["summary"]["ratio_median"]


@pytest.mark.slow  # make test-all; the suite's time budget
def test_attention_bench_tiny_runs_both_paths_and_they_agree(tmp_path):
    """experiments.bench_attention --tiny (the CPU smoke of the GPU/TPU benchmark): rows
    for the XLA path and the Pallas kernel (interpret mode), forward and forward+backward,
    at seq 64 and 128 in bf16, the kernel within bf16 rounding of the XLA path."""
    out = tmp_path / "attention.json"
    cmd = [
        sys.executable,
        "-m",
        "experiments.bench_attention",
        "--tiny",
        "--reps=1",
        f"--out={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["machine"]["cpu"] and record["machine"]["jaxlib"] and "git" in record
    rows = record["rows"]
    keys = {(r["impl"], r["mode"], r["seq_len"]) for r in rows}
    assert keys == {
        (impl, mode, t)
        for impl in ("xla", "pallas", "pallas_fused")
        for mode in ("forward", "forward+backward")
        for t in (64, 128)
    }
    for row in rows:
        assert row["seconds"] > 0 and row["temp_bytes"] >= 0
        # forward 3 B H T^2 K causal FLOPs; forward+backward 3x (tokens 256: B = 256 / T)
        flops = 3 * (256 // row["seq_len"]) * 2 * row["seq_len"] ** 2 * 16
        work = flops * (3 if row["mode"] == "forward+backward" else 1)
        assert row["tflops_per_sec"] == pytest.approx(work / row["seconds"] / 1e12, rel=1e-6)
        if row["impl"] != "xla":
            assert row["max_rel_diff_vs_xla"] < 2e-2, row


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--seqs=abc"], ["--seqs=abc", "positive lengths"]),
        (["--seqs=512,0"], ["--seqs=512,0"]),
        (["--reps=0"], ["--reps=0: pass 1 or more"]),
        (["--train_step", "--preset=nope"], ["unknown preset 'nope'", "1.4b"]),
        (["--train_step", "--steps=0"], ["--steps=0: pass 1 or more"]),
    ],
)
def test_attention_bench_bad_flags_are_one_line(flags, needles):
    cmd = [sys.executable, "-m", "experiments.bench_attention", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    _one_line_error(proc, *needles)


@pytest.mark.slow  # make test-all; the kernels' own tests are in tests/test_pallas_attention.py
def test_attention_check_compares_output_and_six_gradients(tmp_path):
    """experiments.bench_attention --check (the first step of benchmarks/gpu_run.sh),
    here on CPU in interpret mode: every output at both lengths, for both backwards
    (three kernels; one with atomic adds), each within bf16 rounding of the XLA path,
    and exit 0."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "experiments.bench_attention", "--tiny", "--check", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "kernel matches the XLA path"
    rows = json.loads(out.read_text())["rows"]
    outputs = ("out", "dq", "dk", "dv", "dr", "du", "dv_bias")
    assert [(r["seq_len"], r["backward"], r["output"]) for r in rows] == [
        (t, b, o) for t in (40, 64) for b in ("split", "fused") for o in outputs
    ]
    assert all(r["ok"] and r["max_rel_diff_vs_xla"] < 2e-2 for r in rows), rows

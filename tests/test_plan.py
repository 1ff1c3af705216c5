"""The AOT planner: its bytes against real arrays, its JSON, its errors, and a deviceless
TPU compile (run where libtpu is importable, e.g. after `make test-all`; skipped with
the reason otherwise). The CLI runs in subprocesses so each sets up jax its own way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import common
from experiments.configs import gopher as gopher_configs
from gopher import hlo, metrics, plan, plan_search, sharding, topology
from gopher import train as train_lib
from gopher.config import ParallelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU_SITE = os.path.join(ROOT, ".venv", "libtpu-site")  # where `make test-all` puts it
TINY = ["--config=experiments/configs/gopher.py:tiny", "--model=2", "--microbatches=1"]
TEST = "--config=experiments/configs/gopher.py:test"


def _tpu_env() -> dict | None:
    """An environment in which libtpu imports: this one, or .venv/libtpu-site."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if topology.libtpu_available():
        return env
    if os.path.isdir(os.path.join(LIBTPU_SITE, "libtpu")):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [LIBTPU_SITE, env.get("PYTHONPATH")]))
        return env
    return None


def _cli(args, env=None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.plan", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


needs_libtpu = pytest.mark.skipif(
    _tpu_env() is None,
    reason="libtpu is not importable (nor in .venv/libtpu-site): run `make test-all` or "
    "`pip install -e .[tpu]` for the TPU-topology tests",
)


@pytest.fixture(scope="module")
def tiny_plan():
    """The planner's report for tiny on the suite's 8 CPU devices, mesh (4, 2), ZeRO-1."""
    model_cfg, train_cfg, _, _ = common.configs_from_dict(gopher_configs.get_config("tiny"))
    # XLA's attention: the matmul counts below are of dots, and the CPU kernel's matmuls are
    # a custom call that neither count sees.
    model_cfg = model_cfg.replace(attention="xla")
    parallel = ParallelConfig(data=4, model=2, zero=1)
    devices = plan.topology_devices("cpu:8")
    mesh = plan.physical_mesh(devices, (1, 4, 2))
    hw = plan.hardware(devices, "cpu")
    return model_cfg, train_cfg, parallel, mesh, plan.plan(model_cfg, train_cfg, parallel, mesh, hw)


def test_state_bytes_match_real_arrays(tiny_plan):
    model_cfg, train_cfg, parallel, mesh, report = tiny_plan
    fns = train_lib.make_train_functions(
        model_cfg,
        train_cfg,
        precision=train_cfg.precision,
        activation_constraint=sharding.activation_constraint(mesh),
    )
    state = sharding.shard_train(fns, mesh, parallel, model_cfg).init(jax.random.key(0))
    real_params = max(sharding.bytes_per_device(state.params).values())
    real_opt = max(sharding.bytes_per_device((state.opt_state, state.master)).values())
    real_state = max(sharding.bytes_per_device(state).values())
    per = report["per_device_bytes"]
    assert abs(per["params"] - real_params) <= 0.01 * real_params
    assert abs(per["opt_state"] - real_opt) <= 0.01 * real_opt
    # The donated state is what XLA aliases (inputs reused as outputs).
    assert report["memory_analysis"]["alias"] == real_state == per["state"]


def test_matmul_work_is_split_and_near_the_model_count(tiny_plan):
    report = tiny_plan[-1]
    per = report["per_device_bytes"]
    assert per["temp"] > 0 and per["total"] > per["state"]
    # Two independent counts of the same step's matmuls: what the compiled program runs
    # per device, and the lowered (global) program's over 8 devices. Their ratio is 1 when
    # the mesh splits the work without repeating it (XLA drops a few recomputed ones).
    assert report["matmul_split_ratio"] == pytest.approx(1.0, abs=0.05)
    # Against the closed form 6N + 12LHQT per token (attention's position term and
    # causal chunks move it a little).
    tokens = report["batch"] * report["seq_len"]
    model_flops = metrics.flops_per_token(tiny_plan[0]) * tokens
    assert 0.9 < report["matmul_flops_per_device"] * 8 / model_flops < 1.1
    # The search's pruning floor (state + every layer's saved input) is below what XLA needs.
    model_cfg, train_cfg, parallel, mesh, _ = tiny_plan
    floor = per["state"] + plan_search.residual_bytes(model_cfg, train_cfg, mesh)
    assert 0 < floor <= per["total"]
    # Tensor parallelism that splits the work gathers at most one [b, T, D] block per
    # device inside the layer loop.
    assert report["largest_loop_all_gather_bytes"] <= report["block_bytes"]


def test_json_fields(tmp_path):
    out, md = tmp_path / "plan.json", tmp_path / "plan.md"
    run = _cli(["--topology=cpu:8", *TINY, "--json", f"--out={out}", f"--markdown={md}"])
    assert run.returncode == 0, run.stderr[-2000:]
    obj = json.loads(run.stdout)
    assert obj == json.loads(out.read_text())
    # The markdown table's one row is the JSON's plan (GiB = bytes / 2**30).
    rows = [line for line in md.read_text().splitlines() if line.startswith("| tiny ")]
    assert len(rows) == 1, md.read_text()
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    per = obj["per_device_bytes"]
    assert cells[1] == "1 x 4 x 2" and cells[4] == "1" and cells[6] == str(obj["batch"])
    assert float(cells[9]) == pytest.approx(per["temp"] / 2**30, abs=0.006)
    assert cells[10].startswith(f"{per['total'] / 2**30:.2f} / ") and cells[10].endswith("fits")
    for key in ("fits", "hbm_bytes", "compile_seconds", "per_device_bytes", "search"):
        assert key in obj, key
    assert set(obj["per_device_bytes"]) >= {"params", "opt_state", "temp", "total"}
    # What the step holds, its code included (XLA's memory_analysis, from the JSON).
    xla = obj["memory_analysis"]
    assert (
        per["total"] == xla["argument"] + xla["output"] - xla["alias"] + xla["temp"] + xla["code"]
    )
    assert obj["mesh"] == {"replica": 1, "data": 4, "model": 2}
    assert obj["fits"] and obj["compile_seconds"] > 0


@pytest.mark.parametrize("bad", ["v9:4x4", "v3", "cpu:x", "v3:4by4"])
def test_bad_topology_is_one_line(bad):
    run = _cli([f"--topology={bad}", *TINY])
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and bad in lines[0] and "--topology=v3:32x32" in lines[0], lines


# Slice shapes Cloud TPU sells (accelerator types v2-8 ... v6e-256), the largest of each.
REAL_SLICES = [
    "v2:2x2",
    "v2:16x16",
    "v3:2x2",
    "v3:32x32",
    "v4:2x2x1",
    "v4:2x2x2",
    "v4:16x16x16",
    "v5e:1x1",
    "v5e:2x4",
    "v5e:16x16",
    "v5p:2x2x1",
    "v5p:16x20x28",
    "v6e:1x1",
    "v6e:16x16",
    "cpu:1",
]


@pytest.mark.parametrize(
    "bad, named",
    [
        ("v4:8x8", "3 positive sizes, e.g. --topology=v4:8x8x16"),
        ("v5p:16x16", "3 positive sizes"),
        ("v3:4x4x4", "2 positive sizes, e.g. --topology=v3:32x32"),
        ("v5e:0x4", "2 positive sizes"),
        ("v5e:32x32", "1024 chips, more than a v5e slice's 256; split it into slices"),
        ("v4:16x16x32", "8192 chips"),
        ("cpu:0", "no devices"),
    ],
)
def test_impossible_slice_shapes_are_one_line(bad, named):
    for good in REAL_SLICES:
        assert topology.parse_topology(good) == tuple(good.split(":"))
    with pytest.raises(ValueError) as err:
        topology.parse_topology(bad)
    message = str(err.value)
    assert "\n" not in message and repr(bad) in message and named in message, message


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--model=2", "--microbatches=3"], "nothing compiled: mesh (1, 4, 2) K=3: batch 8"),
        (["--zero=x"], "--zero=x: use 0, 1 or 3"),
    ],
)
def test_a_plan_ruled_out_by_its_flags_is_one_line_not_none_fits(flags, named, tmp_path):
    """A batch that 3 microbatches do not split compiled nothing and printed "none fits",
    exit 0, as if the model were too big; the reason was only in the JSON. With
    --markdown the table of a preset without a plan raised KeyError: 'model'."""
    md = tmp_path / "x.md"
    run = _cli(
        ["--topology=cpu:8", TEST, *flags, f"--markdown={md}", f"--out={tmp_path / 'x.json'}"]
    )
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and named in lines[-1], lines
    assert "Traceback" not in run.stderr
    assert "none fits" not in run.stdout + run.stderr


def test_schedule_batches_are_each_planned_and_reported(tmp_path):
    """A batch schedule (8, then 16 after step 1): the JSON and the table carry each
    batch's total; the plan's own figures are the largest batch's (the one that binds)."""
    md, out = tmp_path / "plan.md", tmp_path / "plan.json"
    schedule = "--config.train.batch_schedule=((1, 16),)"
    run = _cli(
        ["--topology=cpu:8", TEST, schedule, "--model=2", "--microbatches=1", "--zero=1"]
        + ["--json", f"--out={out}", f"--markdown={md}"]
    )
    assert run.returncode == 0, run.stderr[-2000:]
    obj = json.loads(run.stdout)
    batches = {b["batch"]: b for b in obj["batches"]}
    assert sorted(batches) == [8, 16] and obj["batch_sizes"] == [8, 16]
    totals = {b: r["per_device_bytes"]["total"] for b, r in batches.items()}
    assert totals[8] < totals[16] == obj["per_device_bytes"]["total"] and obj["batch"] == 16
    rows = [line for line in md.read_text().splitlines() if line.startswith("| test ")]
    assert len(rows) == 2, md.read_text()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[10].startswith(f"{totals[int(cells[6])] / 2**30:.2f} / "), cells
    assert "8: " in run.stderr and "16: " in run.stderr  # the summary line names both


def test_a_search_stopped_by_its_cap_is_not_none_fits():
    """--max_compiles=1 with the first candidate (K=1) over the memory: the search stopped
    before K=2 and the CLI printed "best none fits", exit 0, as if nothing could fit."""
    run = _cli(
        ["--topology=cpu:8", TEST, "--model=2", "--zero=1", "--max_compiles=1"]
        + ["--hbm_gib=0.001"]  # above the state and saved inputs, below any total
    )
    assert run.returncode == 3, run.stdout + run.stderr
    assert "none fits" not in run.stdout + run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "--max_compiles" in last and "--time_budget" in last and "after 1 compile" in last


def test_a_plan_ruled_out_by_memory_says_does_not_fit():
    """Every candidate's state alone over --hbm_gib: not a bad flag (exit 2) but the
    answer, which names the smallest state and the memory."""
    run = _cli(["--topology=cpu:8", TEST, "--hbm_gib=0.0001"])
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit" in lines[0] and "smallest" in lines[0], lines


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--data=0"], "--data"),
        (["--slices=0"], "--slices"),
        (["--replica=-1"], "--replica"),
        (["--mfu=0"], "--mfu"),
        (["--mfu=1.5"], "--mfu"),
        (["--hbm_gib=-1"], "--hbm_gib"),
        (["--max_compiles=0"], "--max_compiles"),
        (["--time_budget=0"], "--time_budget"),
        (["--model=-2"], "--model"),
        (["--batch=-8"], "--batch"),
        (["--microbatches=-1"], "--microbatches"),
    ],
)
def test_bad_numbers_are_one_line(flags, named):
    """--data=0 and --slices=0 raised ZeroDivisionError or IndexError tracebacks; --mfu=0
    (or negative, on TPU) divided by zero or gave negative times; --max_compiles=0
    printed "none fits"."""
    run = _cli(["--topology=cpu:8", TEST, *flags])
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--config.train.remat=none"], "--remat"),
        (["--config.train.microbatches=2"], "--microbatches"),
        (["--config.parallel.zero=3"], "--zero"),
        (["--config.parallel.model=2"], "--model"),
        (["--config.train.batch_size=16", "--batch=8"], "--batch"),
        (["--data=4", "--model=1"], "--model"),
        (["--search", "--remat=none"], "--search_remat"),
        (["--search", "--zero=1"], "--search_zero"),
        (["--search_zero=1"], "--search"),
        (["--nomegacore", "--topology=v3:2x2"], "--nomegacore"),
        (["--slices=2"], "--slices"),
        (["--model=3"], "--model"),
        (["--precision=fp8"], "--precision"),
    ],
)
def test_flags_the_planner_would_ignore_are_refused(flags, named):
    """Each of these was overridden or ignored without a word (the plan was for another
    program), or the error named a --config flag the planner does not read."""
    run = _cli(["--topology=cpu:8", TEST, *flags])
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    if not any(f.startswith("--config.") for f in flags):  # the fix names our flags
        assert "--config." not in lines[0], lines


def test_missing_libtpu_names_the_fix(monkeypatch):
    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    with pytest.raises(ValueError, match=r"pip install -e \.\[tpu\]"):
        topology.prepare_environment("v3:2x2")


def test_peak_flops_per_device():
    assert metrics.peak_flops_per_device("TPU v3") == 61.5e12
    assert metrics.peak_flops_per_device("TPU v2") == 22.5e12
    assert metrics.peak_flops_per_device("TPU v5") == 459e12  # v5p, megacore
    assert metrics.peak_flops_per_device("TPU v4", num_cores=2) == 275e12
    assert metrics.peak_flops_per_device("TPU v4", num_cores=1) == 137.5e12  # no megacore
    assert metrics.peak_flops_per_device("TPU v3", num_cores=1) == 61.5e12
    assert metrics.peak_flops_per_device("TPU v6 lite", num_cores=1) == 918e12


def test_collective_bytes_from_hlo_text():
    text = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ar = f32[8]{0} all-reduce(%x), replica_groups=[2,2]<=[4], to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

ENTRY %main (a: f32[8]) -> f32[16] {
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body
  ROOT %ag = f32[16]{0} all-gather(%a), replica_groups={{0,2},{1,3}}, dimensions={0}
}
"""
    # In-loop all-reduce: 5 trips x 2 (n-1)/n x 32 bytes over groups {0,1},{2,3};
    # the all-gather: (n-1)/n x 64 bytes over groups {0,2},{1,3}.
    module = hlo.Module(text)
    one_slice = module.link_bytes([0, 0, 0, 0])
    assert one_slice["all-reduce"] == 5 * 32 and one_slice["all-gather"] == 32
    assert one_slice["ici"] == 5 * 32 + 32 and one_slice["dcn"] == 0
    two_slices = module.link_bytes([0, 0, 1, 1])  # {0,2} spans the slices
    assert two_slices["dcn"] == 32 and two_slices["ici"] == 5 * 32
    groups = hlo.replica_groups("replica_groups=[2,2]<=[2,2]T(1,0)", 4)
    np.testing.assert_array_equal(groups, [[0, 2], [1, 3]])


def test_fused_reduce_scatter_permute_and_mesh_groups():
    text = """HloModule m, num_partitions=4

%all-reduce-scatter.1 (p: f32[16]) -> f32[4] {
  %p = f32[16]{0} parameter(0)
  %ar = f32[16]{0} all-reduce(%p), replica_groups={}, to_apply=%add
  ROOT %ds = f32[4]{0} dynamic-slice(%ar, %o), dynamic_slice_sizes={4}
}

ENTRY %main (a: f32[16]) -> f32[4] {
  %cp = f32[16]{0} collective-permute(%a), source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  ROOT %f = f32[4]{0} fusion(%cp), kind=kOutput, calls=%all-reduce-scatter.1
}
"""
    # The fusion is a reduce-scatter over all 4 devices ({}, across the slices):
    # (n-1) x 16 bytes; the permute sends its 64 bytes, within the slices.
    two_slices = hlo.Module(text).link_bytes([0, 0, 1, 1])
    assert two_slices == {"ici": 64, "dcn": 48, "collective-permute": 64, "reduce-scatter": 48}
    # A multi-slice TPU program is compiled per slice; its cross-slice all-reduce is a
    # host-transfer send to the Megascale runtime: 2 (n-1)/n x 32 bytes over 4 slices
    # (one device per slice here, so the permute and the fusion cross slices too).
    send = (
        "  %s = (f32[8]{0}, u32[], token[]) send(%a, %tok), is_host_transfer=true, "
        'frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}\n'
    )
    dcn = hlo.Module(text.replace("  ROOT %f", send + "  ROOT %f")).link_bytes([0, 1, 2, 3])
    assert dcn["all-reduce"] == 2 * 3 / 4 * 32 and dcn["ici"] == 0
    assert dcn["dcn"] == 2 * 3 / 4 * 32 + 48 + 64
    # A mesh whose devices are not in id order: position p holds device_ids[p].
    attrs = "replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'b'}"
    np.testing.assert_array_equal(hlo.replica_groups(attrs, 4), [[0, 2], [1, 3]])


@needs_libtpu
def test_tpu_topology_compile(tmp_path):
    """tiny on v3:2x2 (4 chips, 8 core-devices) compiles deviceless; a v3 core's peak is
    half a chip's, read from libtpu's own devices."""
    run = _cli(
        ["--topology=v3:2x2", *TINY, "--json", f"--markdown={tmp_path / 'plan.md'}"],
        env=_tpu_env(),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    obj = json.loads(run.stdout)
    assert obj["device_kind"] == "TPU v3" and obj["devices"] == 8
    assert obj["peak_flops_per_device"] == 61.5e12
    assert obj["hardware"]["devices_per_chip"] == 2
    # A v3 core has 16 GiB (half a chip's 32); XLA:TPU leaves 15.48G of it to programs
    # ("Used 21.95G of 15.48G hbm", LargeWorldModel/LWM#60), and fits are judged on that.
    assert obj["hbm_nominal_bytes"] == 16 * 2**30 and obj["fits"]
    assert obj["hbm_bytes"] <= 15.48 * 2**30
    table = (tmp_path / "plan.md").read_text()
    assert "16 GiB nominal" in table and "15.48 GiB usable" in table, table
    assert obj["matmul_split_ratio"] is None  # TPU writes matmuls as convolutions
    assert obj["roofline_step_seconds"] > 0 and obj["collective_bytes_per_device"]["ici"] > 0


@needs_libtpu
def test_real_slices_are_libtpus_and_its_refusals_one_line():
    """Every slice shape parse_topology takes for REAL_SLICES is one libtpu builds, with its
    chips' devices (v2 and v3 two cores a chip); a shape libtpu refuses (v5e:3x3 is not a
    whole number of 2x2 hosts) is a one-line ValueError rather than libtpu's traceback."""
    code = (
        "import json, sys\n"
        "from gopher import plan\n"
        "out = {t: len(plan.topology_devices(t)) for t in sys.argv[1:]}\n"
        "try:\n"
        "    plan.topology_devices('v5e:3x3')\n"
        "except ValueError as e:\n"
        "    out['error'] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    tpus = [t for t in REAL_SLICES if not t.startswith("cpu")]
    env = {**_tpu_env(), "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code, *tpus], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.splitlines()[-1])
    for t in tpus:
        gen, shape = t.split(":")
        chips = int(np.prod([int(n) for n in shape.split("x")]))
        assert out[t] == chips * (2 if gen in ("v2", "v3") else 1), (t, out[t])
    error = out["error"]
    assert "\n" not in error and "v5e:3x3" in error and "--topology=v5e:16x16" in error, error

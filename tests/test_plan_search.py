"""The planner's search and hardware table, in process on the suite's 8 CPU devices with the
`test` preset (each compile a few seconds): every batch size of a schedule must fit, HBM is
what the runtime leaves (fake TPU devices, no libtpu), both of XLA:TPU's out-of-memory
texts read as "does not fit", and a failed compile of one candidate does not end the search.
The oracles are real compiles (`plan.plan` of one batch), the error texts' own numbers and
the chips' data sheets."""

from __future__ import annotations

import dataclasses
import re

import jax
import pytest

from experiments import common
from experiments.configs import gopher as gopher_configs
from gopher import plan, plan_search, topology
from gopher.config import ParallelConfig

GiB = 2**30


@pytest.fixture(scope="module")
def test_preset():
    """The `test` preset with a schedule (batch 8, then 16 after step 1) on cpu:8, and the
    totals one compile of each (batch, K) gives at mesh (1, 4, 2), ZeRO-1, full remat."""
    model_cfg, train_cfg, _, _ = common.configs_from_dict(gopher_configs.get_config("test"))
    train_cfg = dataclasses.replace(
        train_cfg, batch_size=8, batch_schedule=((1, 16),), remat="full"
    )
    devices = plan.topology_devices("cpu:8")
    mesh = plan.physical_mesh(devices, (1, 4, 2))
    hw = plan.hardware(devices, "cpu")
    parallel = ParallelConfig(data=4, model=2, zero=1)
    single = {}
    for batch, k in ((16, 1), (16, 2)):
        cfg = dataclasses.replace(train_cfg, batch_size=batch, batch_schedule=(), microbatches=k)
        single[batch, k] = plan.plan(model_cfg, cfg, parallel, mesh, hw)["per_device_bytes"]
    return model_cfg, train_cfg, devices, hw, single


def test_every_batch_of_the_schedule_must_fit(test_preset):
    """HBM between the batch-16 totals at K=1 and K=2 (above batch 8's at K=1): the
    search planned batch 8 only and took K=1, which training's own check refuses at the
    switch to 16. Now K=1 does not fit, K=2 does, and each batch's total is reported."""
    model_cfg, train_cfg, devices, hw, single = test_preset
    k1, k2 = single[16, 1]["total"], single[16, 2]["total"]
    assert k2 < k1
    hw = dataclasses.replace(hw, hbm_bytes=(k1 + k2) / 2)
    space = plan_search.Space(models=(2,), zeros=(1,), remats=("full",))
    result = plan_search.search(model_cfg, train_cfg, devices, hw, space)
    first = result["tried"][0]
    assert first["microbatches"] == 1 and not first["fits"]
    assert first["batch"] == 16 and first["per_device_bytes"]["total"] == k1
    best = result["fits"][0]
    assert best["microbatches"] == 2 and best["fits"]
    batches = {b["batch"]: b for b in best["batches"]}
    assert sorted(batches) == [8, 16]
    assert batches[16]["per_device_bytes"]["total"] == k2
    assert all(b["fits"] for b in batches.values())
    assert best["per_device_bytes"]["total"] == max(
        b["per_device_bytes"]["total"] for b in batches.values()
    )
    # One compile per batch size of the fitting plan, one for the plan that did not fit.
    assert result["compiles"] == 3


def test_the_floor_and_the_split_see_the_largest_batch(test_preset):
    """The pruning floor (state + every layer's saved input) is taken at the largest
    batch: an HBM between batch 8's floor and batch 16's prunes K=1 without compiling."""
    model_cfg, train_cfg, devices, hw, _ = test_preset
    mesh = plan.physical_mesh(devices, (1, 4, 2))
    parallel = ParallelConfig(data=4, model=2, zero=1)
    state = plan_search.state_bytes(model_cfg, train_cfg, parallel, mesh)
    floors = [
        state + plan_search.residual_bytes(model_cfg, train_cfg, mesh, batch=b) for b in (8, 16)
    ]
    # The closed form: layers x rows per device x T x D x bytes of the compute dtype.
    itemsize = 4 if train_cfg.precision == "fp32" else 2
    rows16 = 16 // 4
    assert floors[1] - state == model_cfg.num_layers * rows16 * model_cfg.seq_len * (
        model_cfg.d_model * itemsize
    )
    hw = dataclasses.replace(hw, hbm_bytes=(floors[0] + floors[1]) / 2)
    space = plan_search.Space(models=(2,), zeros=(1,), remats=("full",), microbatches=(1,))
    result = plan_search.search(model_cfg, train_cfg, devices, hw, space)
    assert result["compiles"] == 0 and not result["fits"]
    assert any("saved layer inputs" in p for p in result["pruned"]), result["pruned"]


# XLA:TPU's two out-of-memory texts, as public issues quote them (v3: LargeWorldModel/LWM#60,
# v4: erfanzar/EasyDeL#166, v2: sokrypton/ColabFold#62, v5e: the runtime-style text).
OOM_V3 = (
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
    "hbm. Used 21.95G of 15.48G hbm.\n Exceeded hbm capacity by 6.47G.\n\nTotal hbm usage >= "
    "22.47G:\n    reserved        530.00M\n    program          21.95G\n    arguments     0B\n"
)
OOM_V4 = (
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
    "hbm. Used 63.80G of 30.75G hbm. Exceeded hbm capacity by 33.05G.\n\nTotal hbm usage >= "
    "65.05G:\n    reserved          1.25G\n    program          63.80G\n    arguments      "
    "      0B\n\nOutput size 0B; shares 0B with arguments.\n\nProgram hbm requirement 63.80G:\n"
    "    global            1.14M\n    scoped            4.56M\n    HLO temp         63.79G "
    "(100.0% utilization: Unpadded (63.58G) Padded (63.58G), 0.3% fragmentation (210.89M))\n"
)
OOM_V2 = (
    "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 9.08G of 7.48G hbm. "
    "Exceeded hbm capacity by 1.60G."
)
OOM_V5E = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (21.67G) exceeds available HBM (15.75G)."
)


def _gib_in(text: str, pattern: str) -> float:
    return float(re.search(pattern, text).group(1)) * GiB


def _report(state: int = 2 * GiB) -> dict:
    return {"per_device_bytes": {"params": 0, "opt_state": 0, "state": state}}


@pytest.mark.parametrize(
    "text, temp, available",
    [
        (OOM_V4, r"HLO temp\s+([\d.]+)G", r"of ([\d.]+)G hbm"),
        (OOM_V3, r"program\s+([\d.]+)G", r"of ([\d.]+)G hbm"),
        (OOM_V2, r"Used ([\d.]+)G", r"of ([\d.]+)G hbm"),
        (OOM_V5E, r"temporaries \(([\d.]+)G\)", r"HBM \(([\d.]+)G\)"),
    ],
)
def test_both_out_of_memory_texts_are_does_not_fit(text, temp, available):
    """The compile-time text ("Used X of Y hbm") raised "compile failed" and ended the
    whole search; now both texts give fits=False with XLA's figures."""
    report = plan._out_of_memory(_report(), text)
    per = report["per_device_bytes"]
    assert report["fits"] is False
    assert per["temp"] == pytest.approx(_gib_in(text, temp), rel=1e-3)
    assert per["total"] >= per["temp"]
    if "Used" in text:  # XLA's own total of what the program needs
        assert per["total"] >= _gib_in(text, r"Used ([\d.]+)G")
    assert report["hbm_bytes_reported"] == pytest.approx(_gib_in(text, available), rel=1e-3)


def test_other_compile_errors_are_not_memory():
    with pytest.raises(plan.CompileError, match="INTERNAL: boom"):
        plan._out_of_memory(_report(), "INTERNAL: boom\nmore")


def test_a_failed_compile_does_not_end_the_search(test_preset, monkeypatch):
    """The first candidate's compile runs out of memory in the compile-time text, the
    second fails for another reason: both are recorded and the search goes on to a plan
    that compiles and fits."""
    model_cfg, train_cfg, devices, hw, _ = test_preset
    train_cfg = dataclasses.replace(train_cfg, batch_schedule=())
    errors = iter([OOM_V4, "INTERNAL: Mosaic failed to compile"])
    real = jax.stages.Lowered.compile

    def compile_or_fail(self, *args, **kwargs):
        text = next(errors, None)
        if text is not None:
            raise jax.errors.JaxRuntimeError(text)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_or_fail)
    space = plan_search.Space(models=(1, 2, 4), zeros=(1,), remats=("full",), microbatches=(1,))
    result = plan_search.search(model_cfg, train_cfg, devices, hw, space)
    oom, failed, ok = result["tried"]
    assert not oom["fits"] and oom["per_device_bytes"]["temp"] == pytest.approx(63.79 * GiB)
    assert not failed["fits"] and "Mosaic" in failed["compile_error"]
    assert result["errors"] and "Mosaic" in result["errors"][0]
    assert ok["fits"] and result["fits"] == [ok] and ok["mesh"]["model"] == 4


class _FakeTpu:
    """What `plan.hardware` reads of a libtpu device."""

    platform = "tpu"

    def __init__(self, kind: str, coords: tuple, core: int, num_cores: int, slice_index=0):
        self.device_kind, self.coords, self.core_on_chip = kind, coords, core
        self.num_cores, self.slice_index = num_cores, slice_index


def _chips(kind: str, cores_per_device: int, devices_per_chip: int) -> list:
    return [
        _FakeTpu(kind, (x, y, 0), core, cores_per_device)
        for x in range(2)
        for y in range(2)
        for core in range(devices_per_chip)
    ]


@pytest.mark.parametrize(
    "generation, devices, nominal_gib, oom",
    [
        ("v2", _chips("TPU v2", 1, 2), 8, OOM_V2),  # 16 GiB per chip, two cores
        ("v3", _chips("TPU v3", 1, 2), 16, OOM_V3),  # 32 GiB per chip, two cores
        ("v4", _chips("TPU v4", 2, 1), 32, OOM_V4),  # megacore: the chip is one device
        ("v5e", _chips("TPU v5 lite", 1, 1), 16, OOM_V5E),
    ],
)
def test_hbm_is_what_the_runtime_leaves(generation, devices, nominal_gib, oom):
    """Fits were judged against the data sheet's HBM (16 GiB per v3 core), but XLA:TPU
    refuses a program above what its runtime leaves (15.48G of a v3 core)."""
    hw = plan.hardware(devices, generation)
    usable = plan._out_of_memory(_report(), oom)["hbm_bytes_reported"]
    assert hw.hbm_nominal_bytes == nominal_gib * GiB
    assert 0.9 * usable < hw.hbm_bytes <= usable
    assert hw.hbm_bytes < hw.hbm_nominal_bytes


def test_v4_without_megacore_and_every_generation_leaves_less_than_nominal():
    cores = plan.hardware(_chips("TPU v4", 1, 2), "v4")
    chip = plan.hardware(_chips("TPU v4", 2, 1), "v4")
    assert cores.devices_per_chip == 2 and cores.hbm_nominal_bytes == 16 * GiB
    assert cores.hbm_bytes == pytest.approx(chip.hbm_bytes / 2)
    for name, spec in topology.CHIPS.items():
        assert 0.9 * spec.hbm_bytes < spec.usable_bytes < spec.hbm_bytes, name


def test_ici_is_the_data_sheets_per_chip_figure_in_one_convention():
    # Google's pages give v4, v5e and v5p interchip bandwidth per chip as 2400, 1600 and
    # 4800 Gbps, and the newer ones v5e and v5p as 400 and 1200 GB/s bidirectional: one
    # convention, Gbps / 8 x 2, for all three (v4 had been Gbps / 8, charging its
    # collectives twice).
    gbps = {"v4": 2400, "v5e": 1600, "v5p": 4800}
    for generation, rate in gbps.items():
        assert topology.CHIPS[generation].ici_bw == rate * 1e9 / 8 * 2, generation
    assert topology.CHIPS["v5e"].ici_bw == 400e9 and topology.CHIPS["v5p"].ici_bw == 1200e9

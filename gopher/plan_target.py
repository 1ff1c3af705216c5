"""The target a plan compiles for: a topology's devices in physical order and their
hardware figures.

  devices = topology_devices("v3:32x32")   # libtpu's compile-only TPU devices, or CPU devices
  mesh = physical_mesh(devices, (1, 128, 16))
  hw = hardware(devices, "v3")            # per device: usable HBM, peak FLOP/s, link rates

A TPU topology comes from libtpu without chips (`jax.experimental.topologies`); its shape is
checked first (gopher/topology.py parse_topology: the slices Cloud TPU sells), since libtpu
builds shapes no pod has. The mesh puts the model axis on neighbouring chips, as a real run's
would, so the collectives a plan reads are the ones that run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

from gopher import metrics, sharding
from gopher.config import ParallelConfig
from gopher.topology import CHIPS, SLICE_EXAMPLES, TPU_FIX, libtpu_available, parse_topology


def topology_devices(text: str, slices: int = 1, megacore: bool = True) -> list[Any]:
    """Devices of `text` ('v3:32x32', 'cpu:8') over `slices` slices: libtpu's
    compile-only TPU devices (v4 as megacore devices unless `megacore` is False), or
    the first N CPU devices (set XLA_FLAGS' device count before jax starts)."""
    gen, shape = parse_topology(text)
    if gen == "cpu":
        n = int(shape) * slices
        if jax.device_count() < n:
            raise ValueError(
                f"--topology={text} x {slices} slices needs {n} CPU devices but jax has "
                f"{jax.device_count()}; set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
            )
        return jax.devices()[:n]
    if not libtpu_available():
        raise ValueError(f"--topology={text} needs libtpu, which is not importable; {TPU_FIX}")
    from jax.experimental import topologies

    kw = {"chip_config_name": "megacore"} if gen == "v4" and megacore else {}
    if slices > 1:
        kw["num_slices"] = slices
    dims = [int(n) for n in shape.split("x")]
    if len(dims) == 2 and min(dims) < 2:  # v5e-1, v6e-1: a host with fewer chips than 2x2
        kw["chips_per_host_bounds"] = [*dims, 1]
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{shape}", **kw)
    except jax.errors.JaxRuntimeError as e:  # e.g. v5e:3x3, not a whole number of hosts
        if "INVALID_ARGUMENT" not in str(e):
            raise
        reason = str(e).strip().splitlines()[0].removeprefix("INVALID_ARGUMENT: ")
        raise ValueError(
            f"--topology={text}: libtpu refuses it ({reason}); use a slice shape Cloud TPU "
            f"offers, e.g. --topology={gen}:{SLICE_EXAMPLES[gen]}"
        ) from None
    return desc.devices


def physical_mesh(devices: Sequence[Any], shape: tuple[int, int, int]) -> Mesh:
    """Mesh(replica, data, model) in physical order: `create_device_mesh` within one
    slice (the model axis on neighbouring cores / chips), `create_hybrid_device_mesh`
    with the replica axis over slices; CPU devices through sharding.make_mesh."""
    if devices[0].platform == "cpu":
        r, d, m = shape
        return sharding.make_mesh(ParallelConfig(replica=r, data=d, model=m), devices)
    from jax.experimental import mesh_utils

    slices = len({getattr(dev, "slice_index", 0) for dev in devices})
    if slices > 1:
        if shape[0] % slices:
            raise ValueError(
                f"mesh replica={shape[0]} does not divide over {slices} slices; use "
                f"--replica={slices}"
            )
        ici = (shape[0] // slices, shape[1], shape[2])

        def build(**kw):
            return mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices, **kw)
    else:

        def build(**kw):
            return mesh_utils.create_device_mesh(shape, devices, **kw)

    try:
        grid = build()
    except NotImplementedError:  # an axis that is no product of physical axes (v5p 8x8x16, 2)
        grid = build(allow_split_physical_axes=True)
    return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Per-device figures of the devices a mesh holds."""

    kind: str  # device_kind as the devices report it
    peak_flops: float | None
    hbm_bytes: float  # what a plan must fit in: usable HBM (or --hbm_gib; host RAM share)
    hbm_bw: float | None
    ici_bw: float | None
    dcn_bw: float | None
    devices_per_chip: int
    hbm_nominal_bytes: float = 0.0  # the data sheet's HBM per device (CPU: the RAM share)
    hbm_source: str = ""  # where hbm_bytes comes from, for the reports


def hardware(devices: Sequence[Any], generation: str) -> Hardware:
    """The chip table divided by devices per chip (2 for v3 cores and non-megacore v4),
    fits judged against the HBM the TPU runtime leaves usable; CPU devices share the
    host's RAM and have no link figures."""
    dev = devices[0]
    if generation == "cpu":
        ram = os_ram_bytes() / len(devices)
        return Hardware(dev.device_kind, None, ram, None, None, None, 1, ram, "host RAM share")
    chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
    per_chip = len(devices) // len(chips)
    chip = CHIPS[generation]
    return Hardware(
        kind=dev.device_kind,
        peak_flops=metrics.device_peak_flops(dev),
        hbm_bytes=chip.usable_bytes / per_chip,
        hbm_nominal_bytes=chip.hbm_bytes / per_chip,
        hbm_source="usable: what XLA:TPU leaves (topology.USABLE_SOURCES)",
        hbm_bw=chip.hbm_bw / per_chip,
        ici_bw=chip.ici_bw / per_chip,
        dcn_bw=chip.dcn_bw / per_chip,
        devices_per_chip=per_chip,
    )


def os_ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

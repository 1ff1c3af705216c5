"""TPU generations, topology names and the environment a deviceless compile needs.

Nothing here imports jax: `prepare_environment` must run before jax is first imported
(jax reads JAX_PLATFORMS at import and XLA_FLAGS when its CPU backend starts).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one TPU generation (divide by devices per chip for a device).

    Sources: Google Cloud TPU system-architecture pages (vendor data sheets) for
    v4, v5e, v5p, v6e; v2 / v3 from the same pages' older revisions and Norrie et al.
    2021 (IEEE Micro, "The design process for Google's training chips: TPUv2 and
    TPUv3") for their ICI links. ICI is the chip's bidirectional interconnect
    bandwidth; DCN the data-centre network per chip (the host's NICs shared by its
    chips), marked `dcn_assumed` where no data sheet gives it.

    `usable_bytes` is the HBM the TPU runtime leaves to a program (the rest it reserves),
    which is what XLA:TPU refuses a program above; see `USABLE_SOURCES`.
    """

    hbm_bytes: float  # nominal, the data sheet's
    usable_bytes: float  # what XLA:TPU lets a program use, summed over the chip's devices
    hbm_bw: float  # bytes/s
    ici_bw: float  # bytes/s, bidirectional, all links of the chip
    dcn_bw: float  # bytes/s per chip
    dcn_assumed: bool = False


# Usable HBM per device, in GiB, as XLA:TPU's out-of-memory errors print it ("Used X of
# <usable> hbm", "exceeds available HBM (<usable>)"; 2 decimals of 2**30 bytes, so within
# 5 MiB), quoted in public issues. v2 and v3 devices are cores (two per chip); v4
# (megacore), v5e, v5p and v6e devices are chips. A v4 chip without megacore is taken as
# two cores of half the chip's figure (no error text for that mode was found).
USABLE_SOURCES = {
    "v2": (7.48, "sokrypton/ColabFold#62: 'Used 9.08G of 7.48G hbm' (reserved 530.00M)"),
    "v3": (15.48, "LargeWorldModel/LWM#60: 'Used 21.95G of 15.48G hbm' (reserved 530.00M)"),
    "v4": (30.75, "erfanzar/EasyDeL#166 (v4-32): 'Used 63.80G of 30.75G hbm' (reserved 1.25G)"),
    "v5e": (15.75, "v5e-1 reports: 'HLO temporaries (16.23G) exceeds available HBM (15.75G)'"),
    # Not confirmed for v5p: the public errors found with this figure are from TPU7x
    # devices; 0.26 GiB below v5p's 95 (v4 reserves 1.25 GiB), so --hbm_gib to be safer.
    "v5p": (94.74, "'exceeds available HBM (94.74G)' (TPU7x; unconfirmed for v5p)"),
    "v6e": (31.24, "v6e-1 reports: 31.24 GiB available ('about 31.25 GB addressable')"),
}


def _usable(generation: str, devices_per_chip: int) -> float:
    return int(USABLE_SOURCES[generation][0] * GiB) * devices_per_chip


CHIPS = {
    "v2": Chip(16 * GiB, _usable("v2", 2), 700e9, 4 * 496e9 / 8, 100e9 / 8 / 4, dcn_assumed=True),
    "v3": Chip(32 * GiB, _usable("v3", 2), 900e9, 4 * 656e9 / 8, 100e9 / 8 / 4, dcn_assumed=True),
    # ICI: the data sheets give v4, v5e and v5p as 2400, 1600 and 4800 Gbps per chip, and
    # the newer pages v5e and v5p as 400 and 1200 GB/s bidirectional: Gbps / 8 x 2.
    "v4": Chip(32 * GiB, _usable("v4", 1), 1200e9, 2400e9 / 8 * 2, 100e9 / 8 / 4, dcn_assumed=True),
    # 2 x 100 Gbps NICs per 8 chips
    "v5e": Chip(16 * GiB, _usable("v5e", 1), 819e9, 400e9, 200e9 / 8 / 8),
    "v5p": Chip(95 * GiB, _usable("v5p", 1), 2765e9, 1200e9, 50e9 / 8),
    "v6e": Chip(32 * GiB, _usable("v6e", 1), 1638e9, 800e9, 400e9 / 8 / 8, dcn_assumed=True),
}
GENERATIONS = tuple(CHIPS) + ("cpu",)
TPU_FIX = "install libtpu with `pip install -e .[tpu]` (or put it on PYTHONPATH)"


# The slice shapes a generation comes in (Cloud TPU's accelerator types): how many
# dimensions a shape has (v4 and v5p are 3-D tori, the rest 2-D) and the most chips one
# slice holds (v2-512, v3-2048, v4-8192, v5e-256, v5p-17920, v6e-256 in cores or chips);
# more chips than that are several slices (--slices).
SLICE_DIMS = {"v2": 2, "v3": 2, "v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
SLICE_MAX_CHIPS = {"v2": 256, "v3": 1024, "v4": 4096, "v5e": 256, "v5p": 8960, "v6e": 256}
SLICE_EXAMPLES = {
    "v2": "4x4",
    "v3": "32x32",
    "v4": "8x8x16",
    "v5e": "16x16",
    "v5p": "8x16x16",
    "v6e": "16x16",
}


def parse_topology(text: str) -> tuple[str, str]:
    """'v3:32x32' -> ('v3', '32x32'); 'cpu:8' -> ('cpu', '8'). One-line error otherwise,
    naming what a shape of that generation looks like."""
    gen, _, shape = text.partition(":")
    ok = gen in GENERATIONS and (
        shape.isdigit() if gen == "cpu" else bool(re.fullmatch(r"\d+(x\d+){1,2}", shape))
    )
    if not ok:
        raise ValueError(
            f"--topology={text!r} is not a topology; use GENERATION:SHAPE with a generation "
            f"in {', '.join(GENERATIONS)}, e.g. --topology=v3:32x32, v4:8x8x16 or cpu:8"
        )
    if gen == "cpu":
        if int(shape) < 1:
            raise ValueError(f"--topology={text!r} has no devices; use e.g. --topology=cpu:8")
        return gen, shape
    dims = [int(x) for x in shape.split("x")]
    example = f"--topology={gen}:{SLICE_EXAMPLES[gen]}"
    if len(dims) != SLICE_DIMS[gen] or min(dims) < 1:
        raise ValueError(
            f"--topology={text!r}: a {gen} slice's shape is {SLICE_DIMS[gen]} positive sizes, "
            f"e.g. {example}"
        )
    chips = math.prod(dims)
    if chips > SLICE_MAX_CHIPS[gen]:
        raise ValueError(
            f"--topology={text!r} is {chips} chips, more than a {gen} slice's "
            f"{SLICE_MAX_CHIPS[gen]}; split it into slices with --slices, e.g. {example}"
        )
    return gen, shape


def libtpu_available() -> bool:
    """Whether libtpu is importable (installed, or on PYTHONPATH)."""
    spec = importlib.util.find_spec("libtpu")
    return spec is not None and spec.origin is not None  # not a bare namespace directory


def prepare_environment(topology: str, slices: int = 1) -> str:
    """Sets up, before jax is imported, what compiling for `topology` needs; returns
    its generation. TPU: JAX_PLATFORMS=cpu (if unset; the host keeps its CPU backend
    and libtpu compiles deviceless) TPU_WORKER_HOSTNAMES=localhost (one host) and
    ALLOW_MULTIPLE_LIBTPU_LOAD=1 (no chip is opened, so no lock is needed).
    cpu:N: N x slices fake CPU devices via XLA_FLAGS, unless XLA_FLAGS sets a count."""
    gen, shape = parse_topology(topology)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if gen == "cpu":
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            n = int(shape) * slices
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}"
        return gen
    if not libtpu_available():
        raise ValueError(f"--topology={topology} needs libtpu, which is not importable; {TPU_FIX}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling touches no chip: let several planners (and tests) load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return gen

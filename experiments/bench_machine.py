"""The benchmark records' common parts: the machine (CPU model and flags from `lscpu`, cores,
jax/jaxlib, the peer's torch), this process's peak memory, the git revision, and the median
time of a blocking call."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU features that decide which matmul kernels the two stacks can use.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def parse_cpu_info(text: str) -> dict:
    """CPU model and the CPU_FLAGS present, from `lscpu` ("Model name:", "Flags:") or
    /proc/cpuinfo ("model name\\t:", "flags\\t\\t:") text."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    present = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or "unknown",
        "flags": {name: name in present for name in CPU_FLAGS},
    }


HUGETLB = "glibc.malloc.hugetlb=1"


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity; under taskset or a cpuset container
    fewer than the host's), which both sides' thread counts follow."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def timing_env(hugetlb: bool = True) -> dict:
    """This environment with glibc's large allocations on transparent huge pages (as `make
    bench` runs gopher) or, `hugetlb=False`, without that setting. A side by side offers the
    peer both and keeps its faster (the setting speeds gopher's step and slowed torch's
    here), so no malloc setting favours one side."""
    parts = [p for p in os.environ.get("GLIBC_TUNABLES", "").split(":") if p and p != HUGETLB]
    parts += [HUGETLB] if hugetlb else []
    return dict(os.environ, GLIBC_TUNABLES=":".join(parts))


def machine_record(torch_version: str | None = None) -> dict:
    """This host: CPU model and flags of interest, cores, jax/jaxlib (and the peer's torch)."""
    import jax
    import jaxlib

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        text = ""
    if "Model name" not in text and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            text = f.read()
    return {
        **parse_cpu_info(text),
        "cores": usable_cores(),
        "host": platform.node(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "torch": torch_version,
    }


def median_seconds(fn, reps: int, warmups: int = 1) -> float:
    """Median seconds of `reps` calls of `fn`, which must block until its work is done, after
    `warmups` untimed calls."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_gib() -> float:
    """This process's peak resident memory (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def git_revision() -> str:
    """HEAD's short hash, with '+dirty' when tracked files differ from it ('' outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD"], capture_output=True, cwd=ROOT
        ).returncode
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""

"""gopher/host_memory.py: the compiler's freed heap given back, a step's scratch kept.

The oracle is the kernel's count of minor page faults: a program whose temporaries are N
bytes, allocated afresh, faults in about N / page-size pages every run; kept, none."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

# A fresh process: a one-device program with 128 MiB of temporaries (the operand of a
# dot), run 32 times; prints its temp size and each run's page faults. Kept, a run faults the
# block in only when the heap grows by one: glibc 2.36 cannot reuse a freed block for an
# aligned request of its own size until a free neighbour merges with it, so the heap grew by
# 1 to 6 more blocks over eleven tries (the nanoGPT step's by none).
_PROGRAM = """
import json, resource, sys
from gopher import host_memory
inline = host_memory.run_programs_on_calling_thread()
import jax, jax.numpy as jnp

def f(a, b, c):
    return jnp.sin(a[:, None] * b[None, :]) @ c  # [8192, 4096] fp32 made before the dot

a, b, c = jnp.ones(8192), jnp.ones(4096), jnp.ones((4096, 8))
exe = jax.jit(f).lower(a, b, c).compile()
host_memory.release_freed_memory()
kept = host_memory.keep_freed_memory("cpu") if sys.argv[1] == "keep" else False
faults = []
for _ in range(32):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    exe(a, b, c).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
temp = exe.memory_analysis().temp_size_in_bytes
print(json.dumps({"inline": inline, "kept": kept, "temp": temp, "faults": faults}))
"""


def _run(mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="", GLIBC_TUNABLES="")
    proc = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc
def test_kept_scratch_is_not_faulted_in_again_and_without_it_is():
    page = os.sysconf("SC_PAGE_SIZE")
    kept, fresh = _run("keep"), _run("fresh")
    assert kept["inline"] and kept["kept"] and not fresh["kept"]
    pages = kept["temp"] / page
    assert kept["temp"] >= 100 * 2**20  # the premise: temporaries above glibc's mmap threshold
    assert min(fresh["faults"]) > 0.5 * pages  # mapped afresh: faulted in on every run
    grew = sum(f > 0.5 * pages for f in kept["faults"][1:])  # runs that faulted a block in
    assert grew <= 8, kept["faults"]  # the rest reused a kept block
    assert sum(f for f in kept["faults"][1:] if f <= 0.5 * pages) < 0.05 * pages


def test_too_late_to_run_inline_keeps_nothing():
    # Here jax's backend is up (the suite's conftest): the setting cannot take effect, so
    # glibc's policy is left alone.
    import jax

    from gopher import host_memory

    jax.devices()
    assert not host_memory.run_programs_on_calling_thread()
    assert not host_memory.keep_freed_memory("cpu")
    assert jax.config.values["jax_cpu_enable_async_dispatch"]


@glibc
def test_release_freed_memory_returns_freed_heap_pages():
    # What the training loop and the benchmark call after compiling: C heap blocks that
    # were freed but sit below a live one stay resident until malloc_trim returns them.
    from gopher import host_memory

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size, count = 16384, 12800  # 200 MiB in blocks below glibc's mmap threshold
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        libc.memset(b, 1, size)
    pin = libc.malloc(size)  # a live block above them: free() alone cannot shrink the heap
    libc.memset(pin, 1, size)
    for b in blocks:
        libc.free(b)
    held = rss()
    assert host_memory.release_freed_memory()
    assert held - rss() > 0.5 * size * count
    libc.free(pin)

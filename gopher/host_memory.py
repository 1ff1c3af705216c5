"""The C heap under XLA CPU: compile-time memory given back, the step's scratch kept.

XLA CPU allocates a program's temporaries when it runs and frees them when it ends: 1.1
GiB a step at the nanoGPT shape. glibc serves a block that large with a fresh `mmap` and
unmaps it on `free`, so every step faulted in and zeroed 1.1 GiB again (285k minor page
faults and 0.4-0.5 s of kernel time a step on 2 cores). Two settings keep it instead:

1. `run_programs_on_calling_thread()`, before jax's CPU backend starts: a one-device
   program runs on the thread that calls it (`jax_cpu_enable_async_dispatch` off), so its
   temporaries come from the main heap. (On a worker thread they come from that thread's
   arena, which serves blocks over 64 MB with `mmap` whatever glibc is told.) The host
   then prepares the next batch after the step instead of during it. Programs over
   several devices run on XLA's pool either way.
2. `keep_freed_memory()`, after compiling (and `release_freed_memory()`): glibc stops
   mapping large blocks (M_MMAP_MAX 0) and trimming the heap's top below 2 GiB
   (M_TRIM_THRESHOLD), so the block a step frees is there for the next step. Done after
   compiling, not before: the compiler's own memory is first given back.

Measured at the nanoGPT shape (experiments.bench, alternating processes): 0 page faults a
step after the first, the step 2-9% faster, peak RSS 1.93 -> 1.91 GiB (README, Benchmarks).
The cost: glibc 2.36 reuses a freed block for an aligned request of the same size only
once a free neighbour has merged with it, so a heap may first grow by a few such blocks
(in tests/test_host_memory.py's program 1 to 6 over 32 runs, mostly in the first
few, one as late as the 25th; none in 12 nanoGPT steps). The training
loop gives free heap pages back after each checkpoint save and eval (the next step faults
its scratch in once), so a long run's heap holds those few blocks at most between them. Where there is no glibc these
do nothing.
"""

from __future__ import annotations

import ctypes
import functools

_M_TRIM_THRESHOLD = -1  # mallopt's parameters (glibc's malloc.h)
_M_MMAP_MAX = -4
_KEEP_BELOW = 2**31 - 1  # mallopt takes an int: the largest top it leaves untrimmed


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc's, not another libc's)
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> bool:
    """Returns the C heap's free pages to the OS (glibc's malloc_trim(0)); False where
    there is no glibc. Call it after compiling: XLA's compiler frees hundreds of MB that
    malloc keeps, and the step's buffers, allocated afresh, do not reuse them, so the
    process's peak memory counted both (nanoGPT shape on XLA CPU: peak RSS 2.35 -> 2.00
    GiB, step time unchanged)."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))


_inline = False  # whether this process's CPU backend started with async dispatch off


def run_programs_on_calling_thread() -> bool:
    """One-device CPU programs run on the calling thread (their temporaries from the main
    heap, where `keep_freed_memory` can keep them). Takes effect only before jax's
    backends start (call it first thing in a process that trains); returns whether it
    did."""
    global _inline
    import jax

    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # another jax: assume too late
        started = True
    if not started:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
        _inline = True
    return _inline


def keep_freed_memory(platform: str) -> bool:
    """From now on glibc keeps freed blocks for reuse instead of unmapping them (see the
    module's docstring). Only on CPU, and only where programs run on the calling thread
    (`run_programs_on_calling_thread`), the one place it helps; returns whether it did."""
    libc = _libc()
    if platform != "cpu" or libc is None or not _inline:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))


def after_compiling(platform: str) -> None:
    """What the engine (and experiments.bench, as it) does after compiling a step: the
    compiler's freed memory given back, then, on CPU, the steps' scratch kept."""
    release_freed_memory()
    keep_freed_memory(platform)

"""Simulated CPU devices and `--mesh=D,M` parsing for the sharding CLIs.

Both must run before jax initialises its backend, so nothing here imports jax at
module level.
"""

from __future__ import annotations

import contextlib
import os


def parse_mesh(text: str) -> tuple[int, int]:
    """'D,M' -> (data, model) axis sizes."""
    try:
        d, m = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh={text!r} must be D,M (two integers), e.g. --mesh=4,2") from None
    if d < 1 or m < 1:
        raise ValueError(f"--mesh={text!r} needs positive sizes, e.g. --mesh=4,2")
    return d, m


def ensure_cpu_devices(n: int) -> None:
    """Run on CPU (unless JAX_PLATFORMS says otherwise) with n simulated devices."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ask_cpu_devices(n)


def ask_cpu_devices(n: int) -> None:
    """Ask for n simulated CPU devices (unless XLA_FLAGS already sets a count), leaving
    the platform alone: a GPU host keeps its GPUs."""
    import jax

    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # If the backend is already up this fails; callers check jax.device_count().
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_num_cpu_devices", n)


def require_devices(n: int, mesh_text: str) -> None:
    import jax

    if jax.device_count() < n:
        raise ValueError(
            f"--mesh={mesh_text} needs {n} devices but jax has {jax.device_count()}; "
            f"unset XLA_FLAGS or set --xla_force_host_platform_device_count={n} in it"
        )

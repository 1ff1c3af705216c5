"""Fused relative attention for XLA CPU, as an XLA FFI custom call (gopher/csrc/cpu_kernels.cc),
and beside it a BLAS matmul for the MLP, the projections and the output layer, and the
loss's softmax cross-entropy pass over the logits.

XLA CPU runs attention's score matmuls as separate calls with a dozen passes over each
chunk's scores between them (gopher/attention_xla.py); the C++ kernel keeps a chunk's
scores in cache from its two BLAS calls through the skew, mask and softmax to the next
matmul, and reads q, k and v in their packed projection layout. Same maths, fp32 only.

The kernel is compiled on first use with the C++ compiler (`$CXX`, else g++) against
the FFI headers jaxlib ships, into a cache directory keyed by the source and jaxlib
(`$GOPHER_KERNEL_CACHE`, default ~/.cache/gopher-kernels), and calls a BLAS found at run
time: Intel MKL when the `mkl` wheel is installed (`pip install -e '.[cpu]'`, part of
`make`'s environment), else the OpenBLAS inside numpy's wheel. `$GOPHER_CPU_BLAS` = mkl |
openblas picks one, = none turns the kernel off. When it cannot be built or no BLAS is
found, `problem()` says why and attention stays on the XLA path (`attention="auto"`).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_kernels.cc")
# Queries per chunk: at the nanoGPT shape 64 beat 128 (80 against 89 ms a layer forward
# and backward), as the chunk's scores stay in L2.
CHUNK = 64
_TARGETS = (
    "GopherAttentionFwd",
    "GopherAttentionBwd",
    "GopherMatmul",
    "GopherMatmulAdd",
    "GopherSoftmaxXent",
    "GopherGelu",
    "GopherGeluBwd",
    "GopherAdam",
    "GopherRmsNorm",
    "GopherRmsNormBwd",
)
_MKL_SEQUENTIAL = 1  # MKL_Set_Threading_Layer's MKL_THREADING_SEQUENTIAL


class Unavailable(RuntimeError):
    """The kernel cannot run here; the message says why and what to do."""


def _cache_dir() -> str:
    return os.environ.get("GOPHER_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gopher-kernels"
    )


# -fno-math-errno: sqrt without its errno branch, which kept Adam's loop from vectorizing
# (nothing reads errno).
_FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-std=c++17",
    "-shared",
    "-fPIC",
)


def _build() -> str:
    """The compiled library's path, compiling it if this source and jaxlib have none."""
    import jaxlib

    with open(SOURCE, "rb") as f:
        text = f.read() + jaxlib.__version__.encode() + " ".join(_FLAGS).encode()
    path = os.path.join(_cache_dir(), f"cpu_kernels-{hashlib.sha256(text).hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise Unavailable("no C++ compiler (set $CXX or install g++)")
    os.makedirs(_cache_dir(), exist_ok=True)
    # Written beside and renamed: processes building at once each leave a whole file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    os.close(fd)
    cmd = [cxx, *_FLAGS, "-w", "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        os.unlink(tmp)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"compiling {SOURCE} with {cxx} failed: {last}")
    os.replace(tmp, path)
    return path


def _mkl() -> tuple[ctypes.CDLL, str] | None:
    for lib_dir in (os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")):
        found = sorted(glob.glob(os.path.join(lib_dir, "libmkl_rt.so*")))
        if found:
            lib = ctypes.CDLL(found[-1], mode=ctypes.RTLD_GLOBAL)
            lib.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL)
            return lib, "mkl"
    return None


def _openblas() -> tuple[ctypes.CDLL, str] | None:
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    found = sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so")))
    if not found:
        return None
    lib = ctypes.CDLL(found[-1])
    lib.scipy_openblas_set_num_threads64_(1)
    return lib, "openblas"


def _blas(choice: str) -> tuple[int, int, str]:
    """(cblas_sgemm's address, whether it takes 64-bit ints, its name)."""
    found = None
    if choice in ("", "mkl"):
        found = _mkl()
    if found is None and choice in ("", "openblas"):
        found = _openblas()
    if found is None:
        what = {"mkl": "MKL (pip install -e '.[cpu]')", "openblas": "numpy's OpenBLAS"}
        raise Unavailable(f"no BLAS found: {what.get(choice, 'MKL or numpy OpenBLAS')}")
    lib, name = found
    if name == "mkl":
        return ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value, 0, name
    return ctypes.cast(lib.scipy_cblas_sgemm64_, ctypes.c_void_p).value, 1, name


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the registered library, its BLAS's name), or (None, why not)."""
    choice = os.environ.get("GOPHER_CPU_BLAS", "").strip().lower()
    if choice not in ("", "mkl", "openblas", "none"):
        return None, f"GOPHER_CPU_BLAS={choice!r} is unknown; use mkl, openblas or none"
    if choice == "none":
        return None, "turned off (GOPHER_CPU_BLAS=none)"
    try:
        lib = ctypes.CDLL(_build())
        address, ilp64, name = _blas(choice)
    except (Unavailable, OSError) as e:
        return None, str(e)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    lib.gopher_cpu_set_sgemm(ctypes.c_void_p(address), ilp64, threads)
    for target in _TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), "cpu")
    return lib, name


def problem() -> str | None:
    """Why the kernel cannot run in this process, or None when it can."""
    lib, why = _load()
    return None if lib is not None else why


def blas() -> str:
    """The BLAS the kernel calls ("mkl" or "openblas"); raises Unavailable without one."""
    lib, name = _load()
    if lib is None:
        raise Unavailable(name)
    return name


def blas_matmuls(layout, dtype) -> bool:
    """Whether the MLP's and the output layer's matmuls go through the BLAS too (`matmul`):
    where the kernel runs (`layout` chose "cpu", fp32) on one device (a custom call has no
    sharding rule, so under a mesh of several devices XLA's dots stay). At the nanoGPT
    shape MKL ran those GEMMs 1.06-1.31x XLA CPU's dots (one at a time) and the step
    4-9% faster (README, Benchmarks). `GOPHER_CPU_MATMULS=xla` keeps XLA's dots."""
    if os.environ.get("GOPHER_CPU_MATMULS", "blas").strip().lower() == "xla":
        return False
    one_device = layout.mesh is None or layout.mesh.devices.size == 1
    return layout.implementation == "cpu" and one_device and unsupported(dtype, None) is None


def matmul(
    a: jax.Array, b: jax.Array, ta: bool = False, tb: bool = False, add_to: jax.Array | None = None
) -> jax.Array:
    """op(a) @ op(b) for 2-D fp32 a and b through the BLAS, op transposing when ta / tb, plus
    `add_to` when given (summed by the BLAS call into add_to's buffer: XLA reuses it when
    nothing else reads it, as a scan's carry); the result's rows split over XLA's intra-op
    pool. No VJP of its own: it is for the custom VJPs of gopher/layers.py and
    gopher/loss.py, which make their own backward matmuls."""
    blas()  # registers the targets (raises Unavailable when it cannot)
    m = a.shape[1] if ta else a.shape[0]
    n = b.shape[0] if tb else b.shape[1]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    attrs = dict(transa=np.int32(ta), transb=np.int32(tb))
    if add_to is None:
        return jax.ffi.ffi_call("GopherMatmul", out, vmap_method="sequential")(a, b, **attrs)
    call = jax.ffi.ffi_call(
        "GopherMatmulAdd", out, vmap_method="sequential", input_output_aliases={2: 0}
    )
    return call(a, b, add_to, **attrs)


def softmax_xent(
    logits: jax.Array, targets: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy of fp32 logits [N, V] with int32 targets [N]: (the gradient in
    the logits, (softmax - onehot(target)) * scale [N, V], written over the logits' buffer;
    each row's NLL [N], NaN where a target is outside [0, V)). One pass over each row in
    cache, where XLA CPU made five over the whole [N, V] and a gather."""
    blas()  # registers the targets (raises Unavailable when it cannot)
    n, v = logits.shape
    call = jax.ffi.ffi_call(
        "GopherSoftmaxXent",
        (jax.ShapeDtypeStruct((n, v), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32)),
        vmap_method="sequential",
        input_output_aliases={0: 0},
    )
    return call(logits, targets.astype(jnp.int32), scale=np.float32(scale))


def gelu(pre: jax.Array) -> jax.Array:
    """jax.nn.gelu (its tanh form) of fp32 `pre`, one C++ pass (absolute error ~1e-7)."""
    blas()  # registers the targets (raises Unavailable when it cannot)
    out = jax.ShapeDtypeStruct(pre.shape, jnp.float32)
    return jax.ffi.ffi_call("GopherGelu", out, vmap_method="sequential")(pre)


def gelu_backward(pre: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(gelu(pre), g * gelu'(pre)) for fp32 `pre` and `g` of one shape, in one C++ pass, the
    second written over g's buffer: the MLP's backward at its activation."""
    blas()  # registers the targets (raises Unavailable when it cannot)
    out = jax.ShapeDtypeStruct(pre.shape, jnp.float32)
    call = jax.ffi.ffi_call(
        "GopherGeluBwd", (out, out), vmap_method="sequential", input_output_aliases={1: 1}
    )
    return tuple(call(pre, g))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """RMSNorm of fp32 x [N, D] with scale [D]: (x * scale / sqrt(mean(x^2) + eps), the
    per-row inverse norm [N]), one C++ pass over each row."""
    blas()  # registers the targets (raises Unavailable when it cannot)
    n, d = x.shape
    out = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32))
    return tuple(
        jax.ffi.ffi_call("GopherRmsNorm", out, vmap_method="sequential")(
            x, scale, eps=np.float32(eps)
        )
    )


def rms_norm_backward(x, scale, inv, dy) -> tuple[jax.Array, jax.Array]:
    """RMSNorm's gradients (dx [N, D], written over dy's buffer; d scale [D]) from x [N, D],
    scale [D], the inverse norm [N] and dy [N, D], fp32, one C++ pass over each row."""
    blas()  # registers the targets (raises Unavailable when it cannot)
    out = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct(scale.shape, jnp.float32),
    )
    call = jax.ffi.ffi_call(
        "GopherRmsNormBwd", out, vmap_method="sequential", input_output_aliases={3: 0}
    )
    return tuple(call(x, scale, inv, dy))


def adam(
    g: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    p: jax.Array,
    scalars: jax.Array,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One parameter's clipped Adam(W) step in one C++ pass: (mu, nu, p) after it, written
    over the inputs' buffers. fp32 g, mu, nu, p of one shape; `scalars` f32[5] = (the
    gradient's global norm, the clipping norm, 1 - b1^t, 1 - b2^t, -lr). The same maths,
    in optax's order, as optim.make_optimizer's chain followed by optax.apply_updates, where
    XLA CPU made four passes over the parameter's arrays."""
    blas()  # registers the targets (raises Unavailable when it cannot)
    out = jax.ShapeDtypeStruct(p.shape, jnp.float32)
    call = jax.ffi.ffi_call(
        "GopherAdam",
        (out, out, out),
        vmap_method="sequential",
        input_output_aliases={1: 0, 2: 1, 3: 2},
    )
    attrs = dict(b1=b1, one_minus_b1=1 - b1, b2=b2, one_minus_b2=1 - b2, eps=eps)
    attrs.update(eps_root=eps_root, weight_decay=weight_decay)
    return tuple(call(g, mu, nu, p, scalars, **{k: np.float32(v) for k, v in attrs.items()}))


def unsupported(dtype, mask) -> str | None:
    """Why these inputs need the XLA path, or None."""
    if mask is not None:
        return "a mask of its own (the kernel is causal only)"
    if jnp.dtype(dtype) != jnp.float32:
        return f"{jnp.dtype(dtype).name} activations (the kernel is fp32 only)"
    return problem()


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def relative_attention(qkv, r, u, v_bias, chunk: int = CHUNK):
    """Causal relative attention of q (pre-scaled by 1/sqrt(K)), k and v packed as they
    leave their projection, qkv [B, T, 3, H*K] fp32; r [H, T+1, K] projected encodings over
    distances T ... 0; u, v_bias [H, 1, K] (pre-scaled) -> [B, T, H*K]. The same as
    gopher.attention_xla.grouped_relative_attention with no mask."""
    return _forward(qkv, r, u, v_bias, chunk)[0]


def _forward(qkv, r, u, v_bias, chunk):
    blas()  # registers the targets (raises Unavailable when it cannot)
    b, t, _, d = qkv.shape
    h = r.shape[0]
    out, lse = jax.ffi.ffi_call(
        "GopherAttentionFwd",
        (
            jax.ShapeDtypeStruct((b, t, d), jnp.float32),
            jax.ShapeDtypeStruct((h, b, t), jnp.float32),
        ),
        vmap_method="sequential",  # (under vmap: gradient accumulation's per-shard batches)
    )(qkv, r, u, v_bias, chunk=np.int64(chunk))
    return out, (qkv, r, u, v_bias, out, lse)


def _backward(chunk, residuals, d_out):
    qkv, r, u, v_bias, out, lse = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (qkv, r, u, v_bias))
    return tuple(
        jax.ffi.ffi_call("GopherAttentionBwd", shapes, vmap_method="sequential")(
            qkv, r, u, v_bias, out, lse, d_out.astype(jnp.float32), chunk=np.int64(chunk)
        )
    )


relative_attention.defvjp(_forward, _backward)

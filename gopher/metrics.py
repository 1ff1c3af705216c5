"""FLOPs per token, model FLOPs utilisation, bits per byte, and metric writers.

Model FLOPs per token (PaLM App. B): 6 N + 12 L H Q T, where N counts every parameter
that takes part in a matmul (here including the tied embedding, which is the output
projection) and the second term is attention's QK^T and AV over a context of T. The
"causal" convention halves that term, since a causal mask makes half the scores unused.
MFU = achieved model FLOPs/s / peak FLOPs/s (no rematerialisation counted).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from gopher.config import ModelConfig

# Peak dense bf16 FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "tpu v3": 123e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
}


def param_count(config: ModelConfig) -> int:
    """Parameters in matmuls: 13 d^2 L + V d (norm scales and u, v biases excluded)."""
    return config.param_count_formula()


def flops_per_token(config: ModelConfig, seq_len: int | None = None, causal: bool = False) -> float:
    """Training FLOPs per token (forward + backward) in PaLM's convention."""
    t = seq_len or config.seq_len
    attention = 12 * config.num_layers * config.num_heads * config.key_size * t
    if causal:
        attention /= 2
    return 6 * param_count(config) + attention


def peak_flops_per_device(device_kind: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the user's figure, the table's, or None if unknown."""
    if override:
        return float(override)
    kind = device_kind.lower()
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return peak
    return None


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of a few fp32 matmuls on this host (the CPU's practical peak)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def mfu(tokens_per_sec: float, flops_token: float, peak_total: float | None) -> float | None:
    if not peak_total:
        return None
    return tokens_per_sec * flops_token / peak_total


def bits_per_byte(nll_nats_sum: float, num_bytes: int) -> float:
    """Gopher's tokenizer-independent metric: sum NLL / (ln 2 * UTF-8 bytes)."""
    return nll_nats_sum / (math.log(2) * num_bytes)


class MetricsWriter:
    """One JSON object per line in WORKDIR/metrics.jsonl, plus TensorBoard event files."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; JSON lines always work
                self._tb = None

    def write(self, record: dict) -> None:
        clean = {
            k: (v.item() if isinstance(v, (np.floating, np.integer)) else v)
            for k, v in record.items()
        }
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in clean:
            kind = clean.get("kind", "train")
            for k, v in clean.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, clean["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

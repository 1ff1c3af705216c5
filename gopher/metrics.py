"""FLOPs per token, model FLOPs utilisation, bits per byte, and metric writers.

Model FLOPs per token (PaLM App. B): 6 N + 12 L H Q T, where N counts every parameter
that takes part in a matmul (here including the tied embedding, which is the output
projection) and the second term is attention's QK^T and AV over a context of T. The
"causal" convention halves that term, since a causal mask makes half the scores unused.
MFU = achieved model FLOPs/s / peak FLOPs/s (no rematerialisation counted).

Transformer-XL's relative attention (gopher/attention_xla.py) does one more score matmul
than the formula counts: the position term, queries (plus bias v) against the projected
relative positions W_R R, the size of QK^T, so about 6 L H Q T more per token. It is left
out, as in GOPHER.md and PaLM, so that MFU compares with the published figures; the
device does slightly more work than MFU credits.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
import uuid

import numpy as np

from gopher import paths
from gopher.config import ModelConfig

# Peak dense bf16 FLOP/s per *device*, by the device_kind that jax devices report, from
# the vendors' data sheets. A TPU v2 / v3 chip has two TensorCores that jax shows as two
# devices, so a "TPU v3" device is half a 123 TFLOP/s chip; TPU v4 and v5p chips are one
# megacore device each (both cores), v5e / v6e chips have one core.
PEAK_FLOPS = {
    "tpu v2": 22.5e12,  # 45 per chip
    "tpu v3": 61.5e12,  # 123 per chip
    "tpu v4": 275e12,  # megacore chip
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,  # megacore chip
    "tpu v5": 459e12,  # how libtpu names v5p devices
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "h100": 989e12,  # SXM; the PCIe and NVL cards run at lower clocks and power
    "h100 pcie": 756e12,
    "h100 nvl": 835e12,
    "h200": 989e12,
    "a100": 312e12,
}
# Kinds whose table figure is a two-core megacore device. A v4 run without megacore
# (libtpu's chip_config_name "default") shows each core as a device of the same
# device_kind with num_cores == 1: half the figure.
MEGACORE_KINDS = ("tpu v4", "tpu v5p", "tpu v5")


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


def peak_flops_per_device(
    device_kind: str, override: float | None = None, num_cores: int | None = None
) -> float | None:
    """Peak FLOP/s of one device: the user's figure, else the table's for `device_kind`
    (scaled by num_cores / 2 for a megacore kind shown per core), else None."""
    if override:
        return float(override)
    kind = device_kind.lower()
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            if num_cores is not None and name in MEGACORE_KINDS:
                return peak * num_cores / 2
            return peak
    return None


def device_peak_flops(device, override: float | None = None) -> float | None:
    """peak_flops_per_device for a jax device, reading its device_kind and (TPU) num_cores."""
    cores = getattr(device, "num_cores", None) if device.platform == "tpu" else None
    return peak_flops_per_device(device.device_kind, override, cores)


def total_peak_flops(
    device, devices: int, override: float = 0.0, machines: int = 1
) -> tuple[float | None, str]:
    """The MFU denominator of `devices` devices like `device`, and where it came from
    ("override", "table", "measured" or "unknown"): the override or the device table's
    figure per device, times the devices. Simulated CPU devices share their machine's
    cores, so on a CPU the machine's figure (the override, else a measured matmul) counts
    once per machine instead: not per process, since launch.local runs several processes
    on one machine (the training loop and experiments.bench both follow this rule)."""
    shared = device.platform == "cpu"
    count = machines if shared else devices
    if override:
        return override * count, "override"
    peak = device_peak_flops(device)
    if peak is not None:
        return peak * count, "table"
    if shared:
        return measure_cpu_peak_flops() * count, "measured"
    return None, "unknown"


def measure_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of a few fp32 matmuls on this host (the CPU's practical peak): as
    XLA's dot and, where the CPU kernels run, through their BLAS (gopher/cpu_kernels.py,
    which the step's MLP and output layer then use), the faster of the two."""
    import jax
    import jax.numpy as jnp

    from gopher import cpu_kernels

    a = jnp.ones((size, size), jnp.float32)
    ways = [jax.jit(lambda x: x @ x)]
    if cpu_kernels.problem() is None:
        ways.append(jax.jit(lambda x: cpu_kernels.matmul(x, x)))
    best = math.inf
    for f in ways:
        f(a).block_until_ready()
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


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C rotated and offset, so a CRC of CRCs is not trivial."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: length, CRC of the length, payload, CRC of the payload."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc32c(header))
        + data
        + struct.pack("<I", _masked_crc32c(data))
    )


def _drop_torn_line(path: str) -> None:
    """Truncates a local text file after its last newline (a no-op when it ends in one)."""
    if not os.path.exists(path):
        return
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        keep = end
        while keep > 0:
            f.seek(max(0, keep - 65536))
            chunk = f.read(keep - f.tell())
            at = chunk.rfind(b"\n")
            if at >= 0:
                keep = keep - len(chunk) + at + 1
                break
            keep -= len(chunk)
        if keep < end:
            f.truncate(keep)


class _AppendFile:
    """Appends bytes to a local file (flushed per write) or to a GCS object.

    GCS objects cannot be appended to; re-uploading the whole file on every flush
    would cost O(run length) per metric. New bytes are buffered and appended at most
    every `flush_every_s` (and on flush/close) by compose, one small upload each.
    """

    def __init__(self, path: str, flush_every_s: float, lines: bool = False):
        """`lines`: the file holds text lines; a local one a write was cut short in (a
        full disk, a kill) loses its torn last line before a resumed run appends, which
        would otherwise join its first record onto it."""
        self.path = path
        self._gcs = paths.is_gcs(path)
        self._flush_every_s = flush_every_s
        self._buffer = bytearray()
        self._last_flush = time.monotonic()
        if self._gcs:
            meta = paths.stat(path)  # a resumed run appends to the existing object
            self._generation = None if meta is None else meta["generation"]
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if lines:
                _drop_torn_line(path)
            self._file = open(path, "ab")  # noqa: SIM115 (closed in close())

    def write(self, data: bytes) -> None:
        if not self._gcs:
            self._file.write(data)
            self._file.flush()
            return
        self._buffer += data
        if time.monotonic() - self._last_flush >= self._flush_every_s:
            self.flush()

    def flush(self) -> None:
        if not self._gcs or not self._buffer:
            return
        try:
            self._generation = paths.append(self.path, bytes(self._buffer), self._generation)
        except FileExistsError:  # changed by someone else (a restarted writer): append anyway
            meta = paths.stat(self.path)
            self._generation = None if meta is None else meta["generation"]
            self._generation = paths.append(self.path, bytes(self._buffer), self._generation)
        self._buffer.clear()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._gcs:
            self.flush()
        else:
            self._file.close()


def _json_value(value):
    """`value` as strict JSON can hold it: a numpy scalar as a Python number, a NaN or
    infinite float as None (null), inside lists and dicts too."""
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


class MetricsWriter:
    """One JSON object per line in WORKDIR/metrics.jsonl, plus TensorBoard event files.

    WORKDIR may be local or gs://. Locally each record is appended and flushed at once;
    on GCS records are buffered and appended every `flush_every_s` (default 5 s, or
    $GOPHER_METRICS_FLUSH_S) and on `flush()` / `close()`: call `flush()` after each
    checkpoint, so that a killed run keeps every record up to its last checkpoint.
    TensorBoard events are written as TFRecords of `Event` protos (one per record,
    holding its scalars as `kind/name`) in WORKDIR/tensorboard/.

    The lines are strict JSON (jq and JavaScript refuse NaN and Infinity): a non-finite
    number, such as a diverged step's loss, is written as null, and readers take a null
    number for NaN. A value not measured is left out (the first steps' tokens/s).
    """

    def __init__(self, workdir: str, tensorboard: bool = True, flush_every_s: float | None = None):
        if flush_every_s is None:  # GOPHER_METRICS_FLUSH_S=0: every record at once
            flush_every_s = float(os.environ.get("GOPHER_METRICS_FLUSH_S", 5.0))
        self.path = paths.join(workdir, "metrics.jsonl")
        self._jsonl = _AppendFile(self.path, flush_every_s, lines=True)
        self._tb: _AppendFile | None = None
        if tensorboard:
            try:
                from tensorboardX.proto import event_pb2, summary_pb2
            except ImportError:  # TensorBoard is optional; JSON lines always work
                return
            self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
            name = (
                f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}.{uuid.uuid4().hex[:6]}"
            )
            self._tb = _AppendFile(paths.join(workdir, "tensorboard", name), flush_every_s)
            first = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self._tb.write(tfrecord(first.SerializeToString()))

    def write(self, record: dict) -> None:
        """Appends `record` as one line of strict JSON: a non-finite number (a diverged
        step's NaN loss) is written as null, which jq and JavaScript read, not NaN."""
        clean = {k: _json_value(v) for k, v in record.items()}
        self._jsonl.write((json.dumps(clean, sort_keys=True, allow_nan=False) + "\n").encode())
        if self._tb is not None and "step" in clean:
            kind = clean.get("kind", "train")
            values = [
                self._summary_pb2.Summary.Value(tag=f"{kind}/{k}", simple_value=float(v))
                for k, v in clean.items()
                if k not in ("step", "kind")
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v)
            ]
            if values:
                event = self._event_pb2.Event(
                    wall_time=time.time(),
                    step=int(clean["step"]),
                    summary=self._summary_pb2.Summary(value=values),
                )
                self._tb.write(tfrecord(event.SerializeToString()))

    def flush(self) -> None:
        """Pushes buffered records to GCS now (a no-op locally, where writes are flushed)."""
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class NullWriter:
    """MetricsWriter's interface, writing nothing: for processes other than 0."""

    def write(self, record: dict) -> None:
        del record

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

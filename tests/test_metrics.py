"""FLOPs per token, MFU and bits per byte against closed forms; the metrics writer on disk."""

import json
import math

import pytest

from gopher import config, metrics
from gopher.data.proportions import parse_weights


def test_flops_per_token_is_palm_formula():
    c = config.get_preset("44m")
    n = 13 * 512**2 * 8 + 32000 * 512
    assert metrics.flops_per_token(c) == 6 * n + 12 * 8 * 16 * 32 * 2048
    causal = metrics.flops_per_token(c, causal=True)
    assert causal == 6 * n + 6 * 8 * 16 * 32 * 2048
    assert metrics.flops_per_token(c, seq_len=512) == 6 * n + 12 * 8 * 16 * 32 * 512


def test_total_peak_counts_a_cpu_machine_once_and_every_accelerator():
    """The MFU denominator in closed form: simulated CPU devices (one process's 8, or
    launch.local's 2 processes x 4 on one machine) share one machine's cores."""
    import types

    import jax

    cpu = jax.devices("cpu")[0]
    assert metrics.total_peak_flops(cpu, 8, 5e9) == (5e9, "override")
    assert metrics.total_peak_flops(cpu, 8, 5e9, machines=1) == (5e9, "override")
    assert metrics.total_peak_flops(cpu, 16, 5e9, machines=2) == (1e10, "override")
    v3 = types.SimpleNamespace(platform="tpu", device_kind="TPU v3", num_cores=1)
    assert metrics.total_peak_flops(v3, 32, machines=4) == (32 * 61.5e12, "table")
    assert metrics.total_peak_flops(v3, 32, 1e12, machines=4) == (32e12, "override")


def test_mfu_and_peak_lookup():
    assert metrics.peak_flops_per_device("TPU v4") == 275e12
    assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    # The longest name wins: the PCIe and NVL cards' own figures, not the SXM's.
    assert metrics.peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert metrics.peak_flops_per_device("NVIDIA H100 NVL") == 835e12
    assert metrics.peak_flops_per_device("cpu") is None
    assert metrics.peak_flops_per_device("cpu", override=1e12) == 1e12
    assert metrics.mfu(1000.0, 1e9, 2e12) == pytest.approx(0.5)


def test_bits_per_byte():
    # A uniform model over 256 byte values costs exactly 8 bits per byte.
    assert metrics.bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)


def test_mixture_weights_string():
    assert parse_weights("") is None
    assert parse_weights("massivetext") == "massivetext"
    assert parse_weights("books=0.5,code=1") == {"books": 0.5, "code": 1.0}
    with pytest.raises(ValueError, match=r"negative: code.*--config.data.mixture"):
        parse_weights("books=0.5,code=-1")
    with pytest.raises(ValueError, match=r"sum to zero"):
        parse_weights("books=0,code=0")
    with pytest.raises(ValueError, match=r"'books=x' is not SOURCE=NUMBER"):
        parse_weights("books=x")


def strict_json(line: str):
    """json.loads as jq or JavaScript read a line: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON, in {line!r}")

    return json.loads(line, parse_constant=refuse)


def test_metrics_jsonl_is_strict_json_with_non_finite_numbers_as_null(tmp_path):
    """A diverged step's NaN loss or an infinite norm is written as null (still told
    apart from a number by any reader), never as the NaN / Infinity that strict JSON
    readers reject; finite numbers are unchanged."""
    import numpy as np

    nan, inf = float("nan"), float("inf")
    records = [
        {"step": 1, "kind": "train", "loss": nan, "grad_norm": inf, "lr": np.float32(-inf)},
        {"step": 1, "kind": "eval", "heldout_bpb": np.float64(nan), "heldout/a/bpb": 1.25},
        {"step": 2, "kind": "train", "loss": 2.5, "data/a/epochs": np.float32(0.5), "n": 3},
    ]
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    for r in records:
        writer.write(r)
    writer.close()
    with pytest.raises(ValueError, match="NaN is not JSON"):
        strict_json('{"loss": NaN}')  # the oracle refuses what json.dumps writes by default
    back = [strict_json(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert back == [
        {"step": 1, "kind": "train", "loss": None, "grad_norm": None, "lr": None},
        {"step": 1, "kind": "eval", "heldout_bpb": None, "heldout/a/bpb": 1.25},
        {"step": 2, "kind": "train", "loss": 2.5, "data/a/epochs": 0.5, "n": 3},
    ]


def test_metrics_writer_on_local_disk(tmp_path):
    """metrics.jsonl read back as written (numpy scalars as plain numbers, each line on
    disk at once, before any flush or close), and the TensorBoard events read by
    TensorBoard's own loader (which checks every record's CRCs): finite numbers only."""
    import numpy as np
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    writer = metrics.MetricsWriter(str(tmp_path), flush_every_s=3600)
    records = [
        {"step": 1, "kind": "train", "loss": np.float32(2.5), "lr": 1e-3, "note": "x"},
        {"step": 2, "kind": "train", "loss": float("nan"), "skipped": True},
        {"step": 2, "kind": "eval", "heldout_bpb": np.float64(1.25), "tokens": np.int64(7)},
    ]
    for r in records:
        writer.write(r)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    back = [strict_json(x) for x in lines]
    assert back[0] == {"step": 1, "kind": "train", "loss": 2.5, "lr": 1e-3, "note": "x"}
    assert back[1] == {"step": 2, "kind": "train", "loss": None, "skipped": True}
    assert back[2] == {"step": 2, "kind": "eval", "heldout_bpb": 1.25, "tokens": 7}
    writer.close()

    (events_file,) = list((tmp_path / "tensorboard").iterdir())
    events = list(EventFileLoader(str(events_file)).Load())
    assert events[0].file_version == "brain.Event:2"
    scalars = {
        (e.step, v.tag): tensor_util.make_ndarray(v.tensor).item()
        for e in events[1:]
        for v in e.summary.value
    }
    assert scalars == {
        (1, "train/loss"): 2.5,
        (1, "train/lr"): pytest.approx(1e-3),
        (2, "eval/heldout_bpb"): 1.25,
        (2, "eval/tokens"): 7.0,
    }


@pytest.mark.parametrize("torn", [b"", b'{"step": 3, "kind": "tr', b'{"step": 3' * 10_000])
def test_a_resumed_writer_drops_a_torn_last_line(tmp_path, torn):
    """A run killed (or out of disk) part way through a record leaves a torn line; the
    resumed run's first record must not be joined onto it, and no whole line is lost."""
    whole = b'{"step": 1, "kind": "train", "loss": 2.5}\n{"step": 2, "kind": "train"}\n'
    (tmp_path / "metrics.jsonl").write_bytes(whole + torn)
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write({"step": 3, "kind": "train", "loss": 2.0})
    writer.close()
    back = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in back] == [1, 2, 3]
    # A file that is one torn line (nothing whole in it) keeps only the new record.
    (tmp_path / "metrics.jsonl").write_bytes(torn)
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write({"step": 3, "kind": "train", "loss": 2.0})
    writer.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line) == {"step": 3, "kind": "train", "loss": 2.0}

"""FLOPs per token, MFU and bits per byte against closed forms; run artefacts on disk."""

import math

import pytest

from gopher import config, metrics
from gopher.data.pipeline import parse_weights


def test_flops_per_token_is_palm_formula():
    c = config.get_preset("44m")
    n = 13 * 512**2 * 8 + 32000 * 512
    assert metrics.flops_per_token(c) == 6 * n + 12 * 8 * 16 * 32 * 2048
    causal = metrics.flops_per_token(c, causal=True)
    assert causal == 6 * n + 6 * 8 * 16 * 32 * 2048
    assert metrics.flops_per_token(c, seq_len=512) == 6 * n + 12 * 8 * 16 * 32 * 512


def test_mfu_and_peak_lookup():
    assert metrics.peak_flops_per_device("TPU v4") == 275e12
    assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
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

"""What `gopher.sample.generate` takes: every seed it accepts is its own sample, and the
prompts are a list of prompts (a bare string or one list of ids is refused in one line,
not read as a batch of one-character prompts or a TypeError)."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopher import sample, sharding
from gopher.config import ParallelConfig, get_preset
from gopher.inference import from_params
from gopher.model import build_forward


class ByteTokenizer:
    eos_id = 2

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def one():
    cfg = get_preset("test").replace(init_scale=0.1)
    params = jax.jit(build_forward(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    mesh = sharding.make_mesh(ParallelConfig(data=1), jax.devices()[:1])
    return from_params(cfg, params, ByteTokenizer(), mesh)


SEEDS = [0, 5, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**63 - 1, -1, -5, -(2**63)]


@pytest.mark.parametrize("seed", SEEDS)
def test_the_key_holds_the_whole_64_bit_seed(seed):
    """Closed form: threefry's key of a 64-bit seed is its high and low 32-bit words
    (two's complement); jax.random.key(seed) kept only the low word without x64."""
    word = seed % 2**64
    got = np.asarray(jax.random.key_data(sample.seed_key(seed)))
    assert got.tolist() == [word >> 32, word & 0xFFFFFFFF]
    if 0 <= seed < 2**32:  # the keys these seeds always had: their samples are unchanged
        assert got.tolist() == np.asarray(jax.random.key_data(jax.random.key(seed))).tolist()


def test_seeds_2_to_the_32_apart_draw_different_samples(one):
    kw = dict(temperature=1.0, eos_id=-1)
    draws = {s: sample.generate(one, [[11, 12]], 16, seed=s, **kw)[0] for s in SEEDS[:7] + [-1]}
    assert draws[5] != draws[2**32 + 5]
    assert draws[0] != draws[2**32]
    assert draws[-1] != draws[2**32 - 1]
    assert len({tuple(d) for d in draws.values()}) == len(draws)
    assert sample.generate(one, [[11, 12]], 16, seed=2**32 + 5, **kw)[0] == draws[2**32 + 5]


@pytest.mark.parametrize(
    "prompts, message",
    [
        ("ab", "prompts is one string ('ab'); pass a list of prompts, e.g. [prompt]"),
        ([5, 6], "prompts is one list of token ids; pass a list of prompts, e.g. [ids]"),
        (np.array([5, 6]), "prompts is one list of token ids; pass a list of prompts"),
        ([[5, 6], 7], "prompt 1 is 7, not a string or a list of token ids"),
    ],
)
def test_prompts_that_are_not_a_list_of_prompts_are_one_line(one, prompts, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        sample.generate(one, prompts, 4)
    assert "\n" not in str(err.value)


def test_a_list_of_one_string_is_one_prompt(one):
    """The oracle for the refusal above: [text] is the batch of one the string meant."""
    got = sample.generate(one, ["ab"], 4, greedy=True, eos_id=-1)
    assert len(got) == 1
    assert got == sample.generate(one, [[2, 100, 101]], 4, greedy=True, eos_id=-1)


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--seed=9223372036854775807", "--num_samples=2"],
            "error: --seed=9223372036854775807 with --num_samples=2 draws seeds "
            "9223372036854775807 ... 9223372036854775808, outside [-2**63, 2**63); "
            "pass a --seed in [-2**63, 9223372036854775806]",
        ),
        (
            ["--seed=-9223372036854775809"],
            "error: --seed=-9223372036854775809 with --num_samples=1 draws seeds "
            "-9223372036854775809 ... -9223372036854775809, outside [-2**63, 2**63); "
            "pass a --seed in [-2**63, 9223372036854775807]",
        ),
    ],
)
def test_cli_seeds_past_64_bits_are_refused_before_anything_loads(flags, line):
    """Checked with the flags (no workdir needed), not after the first samples print."""
    bad = [sys.executable, "-m", "experiments.sample", "--workdir=/nonexistent", *flags]
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [line]
    assert proc.stdout == ""

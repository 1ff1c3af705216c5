"""Cached sampling (gopher/sample.py, gopher/decode.py) against independent oracles.

The oracle for the cache is the model's own forward pass (GopherLM through
LoadedModel.apply, jitted at one padded length) rerun on the growing sequence, one
unpadded prompt at a time, on one device. Sampling filters are checked against a
numpy formula of the truncated, renormalised distribution. The loops compiled here are
shared between tests (same shapes), so the file stays quick.
"""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopher import sample, sample_checks, sharding
from gopher.config import ParallelConfig, get_preset
from gopher.inference import from_params
from gopher.model import build_forward

NEW = 96  # prompt + 96 > 1.5 x seq_len (64): decoding runs past the training length
EOS = 2


class ByteTokenizer:
    """ids 3..258 are bytes, 259+ two-letter pieces: byte pieces make incomplete UTF-8."""

    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            if 3 <= i < 259:
                out.append(i - 3)
            elif i >= 259:
                out += bytes([97 + i % 26, 97 + (i // 26) % 26])
        return out.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def cfg():
    # A larger init than the default spreads the logits: greedy never sits on a near-tie.
    return get_preset("test").replace(init_scale=0.1)


@pytest.fixture(scope="module")
def params(cfg):
    return jax.jit(build_forward(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


@pytest.fixture(scope="module")
def one(cfg, params):
    mesh = sharding.make_mesh(ParallelConfig(data=1), jax.devices()[:1])
    return from_params(cfg, params, ByteTokenizer(), mesh)


@pytest.fixture(scope="module")
def mesh_model(cfg, params):
    return from_params(
        cfg, params, ByteTokenizer(), sharding.make_mesh(ParallelConfig(data=4, model=2))
    )


@pytest.fixture(scope="module")
def full_forward(one):
    """Greedy decoding by rerunning the whole model: (tokens, logits [N, V])."""
    length = 16 + NEW
    apply = jax.jit(one.apply)

    def run(prompt, n):
        seq, logits = list(prompt), []
        for _ in range(n):
            buf = np.zeros((1, length), np.int32)
            buf[0, : len(seq)] = seq  # right-padded: causal, so the tail cannot matter
            lg = np.asarray(apply(one.params, buf))[0, len(seq) - 1]
            logits.append(lg)
            seq.append(int(np.argmax(lg)))
        return seq[len(prompt) :], np.stack(logits)

    return run


def _rel_err(a, b):
    """Per-step max |a - b| / max |b|."""
    return np.abs(a - b).max(axis=-1) / np.abs(b).max(axis=-1)


def test_cached_greedy_equals_full_forward_past_seq_len(one, full_forward, cfg):
    prompt = [5, 300, 17, 42, 260]  # left-padded to 8 in the cache
    got = sample.generate_with_details(one, [prompt], NEW, greedy=True, eos_id=-1, keep_logits=True)
    want_tokens, want_logits = full_forward(prompt, NEW)
    assert len(prompt) + NEW > 1.5 * cfg.seq_len
    assert got.tokens[0] == want_tokens
    assert got.finish == ["length"]
    err = _rel_err(got.logits[0], want_logits)
    assert err.max() < 1e-5, (err.argmax(), err.max())


def test_ragged_batch_on_4x2_mesh_equals_each_prompt_alone(one, mesh_model, full_forward):
    # Left-padded to 16 in the batch (13, 0 and 9 pads); the oracle runs each unpadded.
    prompts = [[7, 8, 9], list(range(100, 116)), [400, 3, 77, 12, 5, 6, 99]]
    kw = dict(greedy=True, eos_id=-1, keep_logits=True)
    batch = sample.generate_with_details(mesh_model, prompts, NEW, **kw)  # 3 rows + 1 filler
    for r, prompt in enumerate(prompts):
        want, want_logits = full_forward(prompt, NEW)  # alone, unpadded, whole model
        assert batch.tokens[r] == want, r
        assert _rel_err(batch.logits[r], want_logits).max() < 1e-5, r
    # Sampling: row r's draws depend only on (seed, r), not on the other rows or the mesh.
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, seed=7, eos_id=-1, keep_logits=True)
    batch = sample.generate(mesh_model, prompts, NEW, **kw)
    alone = sample.generate(one, prompts[:1], NEW, **kw)
    assert batch[0] == alone[0]


def test_seed_reproduces_and_different_seeds_differ(one):
    kw = dict(temperature=1.0, top_p=0.95, eos_id=-1, keep_logits=True)
    first = sample.generate(one, [[11, 12]], NEW, seed=1, **kw)
    again = sample.generate(one, [[11, 12]], NEW, seed=1, **kw)
    other = sample.generate(one, [[11, 12]], NEW, seed=2, **kw)
    assert first == again
    assert first != other


def _truncated_probs(logits, temperature, top_k, top_p):
    """numpy: softmax(logits / T) over the top-k, then the smallest top set reaching p."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        total, chosen = 0.0, []
        for i in order:
            if not keep[i] or total >= top_p:
                break
            chosen.append(i)
            total += p[i]
        keep = np.isin(np.arange(len(z)), chosen)
        p = np.where(keep, p, 0.0) / p[keep].sum()
    return p


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.6)]
)
def test_sampling_frequencies_match_the_truncated_distribution(temperature, top_k, top_p):
    logits = jnp.array([[2.0, 0.5, -1.0, 1.5, 0.0, 1.0, -0.5, 0.8]])
    want = _truncated_probs(logits[0], temperature, top_k, top_p)
    n = 40_000
    keys = jax.random.split(jax.random.key(3), n)
    draw = jax.jit(
        jax.vmap(
            lambda k: sample.sample_tokens(
                logits, k[None], temperature, top_k, top_p, jnp.bool_(False)
            )[0]
        )
    )
    counts = np.bincount(np.asarray(draw(keys)), minlength=logits.shape[1])
    assert np.all(counts[want == 0] == 0)  # nothing outside the kept set, ever
    kept = want > 0
    expected = n * want[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    # 99.9% quantiles of chi-square with df = 1 ... 7.
    limit = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32][kept.sum() - 2]
    assert chi2 < limit, (counts, expected)


def test_truncate_logits_keeps_exactly_the_naive_set():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 2
    truncate = jax.jit(sample.truncate_logits)
    for top_k, top_p in [(1, 1.0), (7, 1.0), (0, 0.5), (10, 0.3), (0, 1e-6), (50, 0.999)]:
        got = np.asarray(truncate(logits, 1.0, top_k, top_p))
        for row, g in zip(logits, got, strict=True):
            want = _truncated_probs(row, 1.0, top_k, top_p) > 0
            assert np.array_equal(np.isfinite(g), want), (top_k, top_p)
            assert np.allclose(g[want], row[want] - row.max())  # shifted: the same softmax
    keys = jax.random.split(jax.random.key(0), len(logits))
    greedy = sample.sample_tokens(jnp.asarray(logits), keys, 1.0, 0, 1.0, jnp.bool_(True))
    assert np.array_equal(np.asarray(greedy), logits.argmax(-1))


def test_eos_ends_a_row_and_is_not_returned(one):
    kw = dict(greedy=True, keep_logits=True)
    tokens = sample.generate(one, [[5, 6]], NEW, eos_id=-1, **kw)[0]
    eos = tokens[20]
    first = tokens.index(eos)
    got = sample.generate_with_details(one, [[5, 6]], NEW, eos_id=eos, **kw)
    assert got.tokens[0] == tokens[:first]
    assert got.finish == ["eos"]


def test_stop_string_ends_a_row_and_streaming_shows_the_text_before_it(one):
    prompt = [5, 300, 17]
    tok = one.tokenizer
    tokens = sample.generate(one, [prompt], NEW, greedy=True, eos_id=-1, keep_logits=True)[0]
    text = tok.decode(tokens)
    stop = text[30:33]
    cut = text.find(stop)
    pieces = []
    got = sample.generate_with_details(
        one,
        [prompt],
        NEW,
        greedy=True,
        eos_id=-1,
        stop=[stop, "never-there"],
        stream=lambda row, s: pieces.append((row, s)),
    )
    assert got.finish == ["stop"]
    # The row ends at the token that completed the stop string.
    n = len(got.tokens[0])
    assert got.tokens[0] == tokens[:n]
    assert stop in tok.decode(tokens[:n]) and stop not in tok.decode(tokens[: n - 1])
    assert "".join(s for _, s in pieces) == text[:cut]
    assert len(pieces) > 3 and {r for r, _ in pieces} == {0}  # streamed as it came
    texts = sample.generate_text(one, [prompt], NEW, greedy=True, eos_id=-1, stop=[stop])
    assert texts == [text[:cut]]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(top_p=0.0), "top_p = 0.0"),
        (dict(top_k=-1), "top_k = -1"),
        (dict(temperature=-1.0), "temperature = -1.0"),
        (dict(temperature=float("nan")), "temperature = nan"),
        (dict(temperature=float("inf")), "temperature = inf"),
        (dict(top_p=float("nan")), "top_p = nan"),
        (dict(max_new_tokens=0), "max_new_tokens = 0"),
        (dict(prompts=[[]]), "prompt 0 has no tokens"),
        (dict(prompts=[[1, 9999]]), "outside [0, 512)"),
        (dict(stop=[""]), "empty one"),
        (dict(prompts=["ab", [1, 2]]), "mix strings and token lists"),
        (dict(temperature=1e-40), "below float32's smallest normal number"),
        (dict(seed=2**64), "seed = 18446744073709551616"),
        (dict(eos_id=512), "eos_id = 512; pass a token id in [0, 512)"),
        (dict(top_k=2.5), "top_k = 2.5"),
        (dict(prompts=np.zeros((0, 2), np.int32)), "no prompts"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(one, kw, message):
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kw
    with pytest.raises(ValueError, match=re.escape(message)):
        sample.generate(one, args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_arguments_of_numpy_integer_types_and_out_of_range_top_k_work(one):
    """numpy integers are whole numbers; a top_k beyond the vocabulary keeps every token
    (it once overflowed int32); a prompt array is a batch of prompts."""
    kw = dict(temperature=0.7, seed=np.int64(3), eos_id=-1)
    want = sample.generate(one, [[11, 12]], 6, top_k=0, **kw)
    assert sample.generate(one, np.array([[11, 12]]), np.int64(6), top_k=2**40, **kw) == want


def test_a_tiny_temperature_is_greedy_not_overflow(one):
    """1e-30 sends every logit but the top to -inf: the greedy token, with and without
    top-k/top-p (logits / T overflowed to inf and NaN, which drew token 0)."""
    prompt = [[5, 300, 17]]
    greedy = sample.generate(one, prompt, 8, greedy=True, eos_id=-1)
    for kw in (dict(), dict(top_k=3), dict(top_p=0.9)):
        assert sample.generate(one, prompt, 8, temperature=1e-30, eos_id=-1, **kw) == greedy


def test_cli_streams_samples(one, monkeypatch, capsys):
    from absl import flags

    from experiments import sample as cli
    from gopher import inference

    monkeypatch.setattr(inference, "load", lambda workdir, step=None: one)
    # 96 tokens with a stream: the loop the stop-string test compiled.
    argv = ["sample", "--workdir=unused", "--prompt=ab", f"--max_new_tokens={NEW}"]
    argv += ["--num_samples=2", "--seed=3", "--top_k=5"]
    flags.FLAGS(argv)
    try:
        assert cli.main(["sample"]) == 0
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    for i in range(2):
        quiet = dict(stream=lambda row, text: None)  # the CLI's loop, shown nothing
        want = sample.generate_text(one, ["ab"], NEW, seed=3 + i, top_k=5, **quiet)[0]
        assert f"--- sample {i + 1} (seed {3 + i}) ---\nab{want}\n" in out


def test_prompt_runs_in_passes_that_equal_the_full_forward(one, full_forward, monkeypatch):
    """A prompt of 4 passes (chunk 8) gives the whole model's logits and greedy tokens."""
    monkeypatch.setattr(sample_checks, "PREFILL_CHUNK", 8)
    prompt = [(7 * i) % 500 + 3 for i in range(29)]  # 32 padded: passes 0-7, ..., 24-31
    got = sample.generate_with_details(one, [prompt], 20, greedy=True, eos_id=-1, keep_logits=True)
    want_tokens, want_logits = full_forward(prompt, 20)
    assert got.tokens[0] == want_tokens
    assert _rel_err(got.logits[0], want_logits).max() < 1e-5


def test_memory_estimate_covers_the_compiled_prompt_pass(one, cfg):
    """decode_bytes against XLA's own temporaries for a 1,024-token prompt (two passes):
    the score arrays of a pass grow with the prompt; the estimate must not be below."""
    rows, p_len, n = 2, 1024, 8
    run = sample._compiled(
        cfg,
        jnp.dtype(jnp.float32),
        one.mesh,
        rows,
        p_len,
        n,
        False,
        False,
        sample_checks.PREFILL_CHUNK,
    )
    args = (np.zeros((rows, p_len), np.int32), np.ones((rows, p_len), bool), np.zeros(rows, bool))
    scalars = (np.float32(1), np.int32(0), np.float32(1), np.bool_(True), np.int32(-1))
    compiled = run.lower(one.params, *args, jax.random.key(0), *scalars, np.int32(0)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    estimate = sample_checks.decode_bytes(cfg, rows, p_len, n, jnp.float32)
    assert temp <= estimate < 4 * temp, (temp, estimate)


def test_decode_that_cannot_fit_is_refused_before_it_compiles(one, cfg, monkeypatch):
    """The bound is checked against the cache's real size (jax.eval_shape of
    decode.init_cache, an oracle apart from the estimate): a budget one byte short of
    the cache is refused, naming the flag and the most that fits, which does fit."""
    from gopher import decode, engine

    n, p_len = 1000, 8
    valid = jax.ShapeDtypeStruct((1, p_len + n), jnp.bool_)
    shapes = jax.eval_shape(lambda v: decode.init_cache(cfg, v, jnp.float32), valid)
    cache = shapes.k.size * 4 + shapes.v.size * 4
    monkeypatch.setattr(engine, "available_bytes_per_device", lambda free=False: cache - 1)
    with pytest.raises(ValueError) as err:
        sample.generate(one, [[1, 2]], n)
    msg = str(err.value)
    assert msg.startswith(f"max_new_tokens={n} needs") and "\n" not in msg
    most = int(msg.rsplit("at most ", 1)[1])
    assert 0 < most < n
    sample_checks.check_memory(one, 1, p_len, most)  # the number it names passes
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--max_new_tokens=2000000000 needs at least"):
        sample_checks.check_memory(one, 1, p_len, 2_000_000_000, name="--max_new_tokens")


@pytest.mark.parametrize(
    "flag, line",
    [
        ("--top_p=2", "error: --top_p=2.0; pass a probability in (0, 1] (1 keeps all)"),
        (
            "--temperature=nan",
            "error: --temperature=nan; pass a finite number >= 0 (0 means greedy)",
        ),
    ],
)
def test_cli_bad_flag_is_one_line(flag, line):
    bad = [sys.executable, "-m", "experiments.sample", "--workdir=x", flag]
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [line]


@pytest.mark.slow
def test_cli_on_a_trained_workdir(tmp_path):
    workdir = tmp_path / "run"
    train = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/gopher.py:test",
    ]
    train += [f"--workdir={workdir}", "--config.train.steps=2", "--config.train.eval_every=1000"]
    train += ["--config.data.tokenizer_sample_bytes=30000"]
    subprocess.run(train, check=True, capture_output=True, timeout=600)
    run = [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}", "--prompt=The "]
    run += ["--max_new_tokens=20", "--seed=1"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=600)
    again = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.startswith("The ") and len(first.stdout) > len("The \n")
    assert first.stdout == again.stdout  # the seed reproduces the sample
    assert "20 tokens, ended by length" in first.stderr or "ended by eos" in first.stderr


def test_bf16_prefill_equals_the_models_own_forward_at_key_size_32():
    """In bf16 the cache's first logits are the model's: 1/sqrt(K) folded into W_q before
    the cast, as the model folds it (scaling q after the bf16 matmul was 1e-2 off at
    K=32, and greedy tokens drifted from the model's), and `generate` computes in the
    dtype `from_params` was given (it fell back to the params' fp32)."""
    cfg = get_preset("test").replace(num_heads=2, key_size=32, init_scale=0.1)
    params = jax.jit(build_forward(cfg).init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    mesh = sharding.make_mesh(ParallelConfig(data=1), jax.devices()[:1])
    model = from_params(cfg, params, ByteTokenizer(), mesh, compute_dtype=jnp.bfloat16)
    assert sample_checks.compute_dtype_of(model) == jnp.bfloat16
    prompt = [5, 300, 17, 42, 260, 9, 77, 120]  # 8 tokens: no padding in the cache
    got = sample.generate_with_details(model, [prompt], 1, greedy=True, keep_logits=True)
    want = np.asarray(jax.jit(model.apply)(model.params, np.array([prompt], np.int32)))[0, -1]
    err = np.abs(got.logits[0, 0] - want).max() / np.abs(want).max()
    assert err < 2e-3, err

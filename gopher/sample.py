"""Autoregressive sampling from a loaded Gopher model, with a key/value cache.

`generate(model, prompts, max_new_tokens, ...)` left-pads the prompts into one batch,
runs them through the model in one pass that fills the cache (gopher/decode.py), then
decodes one token per step inside a single compiled `lax.while_loop`, which stops as
soon as every row has ended. Rows are split over the mesh's batch axes and heads over
"model", as in training. A compiled loop is reused for every call with the same batch
size, padded prompt length (a multiple of 8) and `max_new_tokens`; temperature, top-k,
top-p, greedy, the seed and the EOS id are arguments of it, not constants. A call whose
cache cannot fit in the devices' memory is refused first (`check_memory`, one line).

A row ends at EOS (not returned), at `max_new_tokens`, or at a stop string. Stop strings
are checked on the host on the decoded text: when stop strings or a `stream` callback
are given, each step sends its tokens to the host (`io_callback`), which decodes them,
prints or streams the new text, and answers which rows hit a stop string; the loop ends
those rows. Streamed text holds back what may still change: an incomplete UTF-8 byte
sequence, and a tail that may be the start of a stop string (which is never shown).

Sampling: logits / temperature, then top-k (the k most likely tokens), then top-p (the
smallest set of the most likely tokens whose probability reaches p; always at least
one), renormalised. Row r's token t is drawn with fold_in(fold_in(seed_key(seed), r), t)
(all 64 bits of the seed count), so a seed reproduces a sample, and a row's sample
depends on the seed, its prompt and its index in the batch only, not on the other rows'
prompts.

Shape glossary: B rows (prompts, padded to the mesh's batch multiple), P padded prompt
length, N max_new_tokens, V vocabulary size.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from gopher import decode, sample_checks
from gopher.config import ModelConfig
from gopher.inference import LoadedModel, pad_rows
from gopher.sample_checks import (
    check_arguments,
    check_memory,
    check_prompt_kinds,
    compute_dtype_of,
)

PROMPT_MULTIPLE = 8  # prompts pad to a multiple of this: fewer distinct compiled loops
_NONE = -1  # "no token" in the output buffer, and an eos_id that never matches


def _scaled(logits: jax.Array, temperature) -> jax.Array:
    """(logits - their max) / temperature in fp32: the same distribution as logits /
    temperature, but a tiny temperature sends the others to -inf, not the top to inf."""
    logits = logits.astype(jnp.float32)
    return (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of a seed in [-2**63, 2**63): threefry's key of its 64 bits, high word
    then low (two's complement). jax.random.key(seed) casts the seed to int32 when x64 is
    off (as here), so seeds 2**32 apart, or -1 and 2**32 - 1, drew the same sample; for
    0 <= seed < 2**32 this is that same key, so those seeds draw what they always drew."""
    word = int(seed) % 2**64
    data = np.array([word >> 32, word & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def truncate_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """(logits [B, V] less their max) / temperature, tokens outside top-k and top-p -inf.

    top_k <= 0 keeps every token; top_p >= 1 keeps every token top-k kept. Ties in the
    order are broken by token id, so top-k keeps exactly k tokens."""
    logits = _scaled(logits, temperature)
    b, v = logits.shape
    order = jnp.argsort(-logits, axis=-1, stable=True)  # [B, V] most likely first
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    keep = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    # The probability of the more likely tokens (an exclusive cumulative sum).
    before = jnp.concatenate([jnp.zeros((b, 1)), jnp.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
    keep = keep & ((top_p >= 1.0) | (before < top_p))
    kept = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], order].set(keep)
    return jnp.where(kept, logits, -jnp.inf)


def sample_tokens(logits, keys, temperature, top_k, top_p, greedy) -> jax.Array:
    """One token per row [B] int32 from logits [B, V] with per-row keys [B]."""

    def draw(_):
        def truncated(lg):
            return truncate_logits(lg, temperature, top_k, top_p)

        def scaled(lg):
            return _scaled(lg, temperature)

        needs_sort = (top_k > 0) | (top_p < 1.0)
        lg = jax.lax.cond(needs_sort, truncated, scaled, logits)
        return jax.vmap(jax.random.categorical)(keys, lg).astype(jnp.int32)

    def argmax(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(greedy, argmax, draw, None)


# Host handlers of the calls in flight, by call id (the compiled loop passes its id).
_HANDLERS: dict[int, Callable] = {}
_CALL_IDS = itertools.count()


def _host_step(call_id, step, tokens, emitted):
    return _HANDLERS[int(call_id)](int(step), np.asarray(tokens), np.asarray(emitted))


@functools.lru_cache(maxsize=16)
def _compiled(
    cfg: ModelConfig, dtype, mesh, rows, prompt_len, new_tokens, host, keep_logits, chunk
):
    """The jitted prefill (in passes of `chunk` positions) + decode loop for one set of
    shapes."""
    constrain = decode.mesh_constraint(mesh, cfg.num_heads)
    length = prompt_len + new_tokens

    def run(params, tokens, prompt_valid, done, key, temperature, top_k, top_p, greedy, eos, cid):
        valid = jnp.concatenate([prompt_valid, jnp.ones((rows, new_tokens), bool)], axis=1)
        cache = decode.init_cache(cfg, constrain(valid, "rows"), dtype)
        cache = cache._replace(k=constrain(cache.k, "cache"), v=constrain(cache.v, "cache"))
        rproj = constrain(decode.projected_encodings(params, cfg, length, dtype), "encodings")
        weights = decode.prepare(params, cfg, dtype)
        for a in range(0, prompt_len, chunk):  # each pass sees the keys up to its end
            part = tokens[:, a : a + chunk]
            logits, cache = decode.forward(
                weights, cfg, part, a, cache, rproj, constrain, last_only=True
            )
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(rows))

        def choose(t, logits, done, reason, out, kept):
            """Token t from logits [B, V]; rows that end are marked."""
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)
            tok = sample_tokens(logits, step_keys, temperature, top_k, top_p, greedy)
            reason = jnp.where(~done & (tok == eos), 1, reason)  # 1: EOS
            emitted = ~done & (tok != eos)
            done = done | (tok == eos)
            out = out.at[:, t].set(jnp.where(emitted, tok, _NONE))
            if host:
                stop = io_callback(
                    _host_step,
                    jax.ShapeDtypeStruct((rows,), jnp.bool_),
                    cid,
                    t,
                    constrain(tok, "replicated"),
                    constrain(emitted, "replicated"),
                )
                stop = constrain(stop, "replicated")  # from device 0's copy: no warning
                reason = jnp.where(emitted & stop, 2, reason)  # 2: stop string
                done = done | stop
            if keep_logits:
                kept = kept.at[:, t].set(logits)
            return tok, done, reason, out, kept

        out = jnp.full((rows, new_tokens), _NONE, jnp.int32)
        kept = jnp.zeros((rows, new_tokens, cfg.vocab_size) if keep_logits else (), jnp.float32)
        reason = jnp.zeros((rows,), jnp.int32)
        first = choose(jnp.int32(0), logits[:, -1], done, reason, out, kept)

        def cond(state):
            return (state[0] < new_tokens) & ~jnp.all(state[3])

        def body(state):
            t, tok, cache, done, reason, out, kept = state
            at = prompt_len + t - 1  # where token t-1 goes
            logits, cache = decode.forward(weights, cfg, tok[:, None], at, cache, rproj, constrain)
            tok, done, reason, out, kept = choose(t, logits[:, 0], done, reason, out, kept)
            return t + 1, tok, cache, done, reason, out, kept

        init = (jnp.int32(1), first[0], cache, *first[1:])
        t, _, _, _, reason, out, kept = jax.lax.while_loop(cond, body, init)
        return out, reason, kept, t

    return jax.jit(run)


class _HostRows:
    """The host's side of the loop: each row's text so far, stop strings, streaming."""

    def __init__(self, tokenizer, num_rows: int, stop: Sequence[str], stream):
        self.tokenizer, self.stop, self.stream = tokenizer, tuple(stop), stream
        self.tokens: list[list[int]] = [[] for _ in range(num_rows)]
        self.shown = [0] * num_rows  # characters streamed
        self.ended = [False] * num_rows

    def __call__(self, step: int, tokens: np.ndarray, emitted: np.ndarray) -> np.ndarray:
        del step
        stop = np.zeros(len(tokens), dtype=bool)
        for r in range(len(self.tokens)):
            if self.ended[r]:
                continue
            if not emitted[r]:  # EOS
                self.finish(r)
                continue
            self.tokens[r].append(int(tokens[r]))
            text = self.tokenizer.decode(self.tokens[r])
            cut = first_stop(text, self.stop)
            if cut is not None:
                stop[r] = True
                self._show(r, text[:cut])
                self.ended[r] = True
            else:
                self._show(r, text[: self._safe_end(text)])
        return stop

    def _safe_end(self, text: str) -> int:
        """How much of `text` cannot change or turn into a stop string later."""
        end = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes as U+FFFD
        held = max(
            (n for s in self.stop for n in range(1, len(s)) if text[:end].endswith(s[:n])),
            default=0,
        )
        return end - held

    def _show(self, r: int, text: str):
        if self.stream is not None and len(text) > self.shown[r]:
            self.stream(r, text[self.shown[r] :])
            self.shown[r] = len(text)

    def finish(self, r: int):
        if not self.ended[r]:
            self.ended[r] = True
            self._show(r, self.tokenizer.decode(self.tokens[r]))


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt (EOS not included)
    finish: list[str]  # per prompt: "eos", "stop" (a stop string) or "length"
    logits: np.ndarray | None = None  # [prompts, N, V] fp32: what token t was drawn from


def generate_with_details(
    model: LoadedModel,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    greedy: bool = False,
    eos_id: int | None = None,
    stop: Sequence[str] = (),
    stream: Callable[[int, str], None] | None = None,
    start_of_document: bool = True,
    keep_logits: bool = False,
    compute_dtype=None,
) -> Generation:
    """Samples up to `max_new_tokens` after each prompt; see `generate`."""
    tok = model.tokenizer
    check_prompt_kinds(prompts)
    strings = [isinstance(p, str) for p in prompts]
    if any(strings) and not all(strings):
        raise ValueError("prompts mix strings and token lists; pass one kind")
    if len(prompts) > 0 and all(strings):
        prefix = [tok.eos_id] if start_of_document else []
        prompts = [prefix + tok.encode(p) for p in prompts]
    prompts = [[int(t) for t in p] for p in prompts]
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    max_new_tokens, top_k, seed = check_arguments(
        model, prompts, max_new_tokens, temperature, top_k, top_p, stop, seed, eos_id
    )
    if (stop or stream is not None) and tok is None:
        raise ValueError("stop strings and streaming decode text; give the model a tokenizer")
    eos = tok.eos_id if eos_id is None else eos_id
    greedy = greedy or temperature == 0
    dtype = jnp.dtype(compute_dtype or compute_dtype_of(model))

    n = len(prompts)
    p_len = -(-max(len(p) for p in prompts) // PROMPT_MULTIPLE) * PROMPT_MULTIPLE
    tokens = np.zeros((n, p_len), np.int32)
    valid = np.zeros((n, p_len), bool)
    for i, p in enumerate(prompts):  # left-padded: the last prompt token is at P-1
        tokens[i, p_len - len(p) :] = p
        valid[i, p_len - len(p) :] = True
    multiple = model.batch_multiple
    check_memory(model, -(-n // multiple) * multiple, p_len, max_new_tokens, dtype, keep_logits)
    tokens = pad_rows(tokens, multiple)
    valid = pad_rows(valid, multiple)
    valid[n:, -1] = True  # a filler row attends to one token, and is done from the start
    done = np.arange(len(tokens)) >= n

    host = bool(stop) or stream is not None
    run = _compiled(
        model.model_cfg,
        dtype,
        model.mesh,
        len(tokens),
        p_len,
        max_new_tokens,
        host,
        keep_logits,
        sample_checks.PREFILL_CHUNK,
    )
    rows = _HostRows(tok, n, stop, stream)
    call_id = next(_CALL_IDS)
    _HANDLERS[call_id] = rows
    put = functools.partial(jax.device_put, device=model.batch_sharding)
    try:
        out, reason, kept, _ = run(
            model.params,
            put(tokens),
            put(valid),
            put(done),
            seed_key(seed),
            np.float32(1.0 if greedy else temperature),
            np.int32(top_k),
            np.float32(top_p),
            np.bool_(greedy),
            np.int32(eos if eos is not None else _NONE),
            np.int32(call_id),
        )
        out, reason = np.asarray(out)[:n], np.asarray(reason)[:n]
    finally:
        del _HANDLERS[call_id]
    for r in range(n if host else 0):  # streams what each row held back
        rows.finish(r)
    names = {0: "length", 1: "eos", 2: "stop"}
    return Generation(
        tokens=[[int(t) for t in row if t != _NONE] for row in out],
        finish=[names[int(x)] for x in reason],
        logits=np.asarray(kept)[:n] if keep_logits else None,
    )


def generate(model: LoadedModel, prompts, max_new_tokens: int, **kw) -> list[list[int]]:
    """The generated token ids after each prompt (prompt not included, EOS dropped).

    prompts: token-id lists, or strings (encoded with the model's tokenizer, after an
    EOS when `start_of_document`: training saw each document after an EOS).
    temperature (0: greedy), top_k (0: off), top_p (1: off), seed, greedy, eos_id
    (default the tokenizer's; -1: none), stop (strings that end a row: its tokens end
    with the one that completed the stop string), stream(row, text) (called as text
    is decoded), compute_dtype (default that of `model.apply`).
    """
    return generate_with_details(model, prompts, max_new_tokens, **kw).tokens


def generate_text(model: LoadedModel, prompts, max_new_tokens: int, **kw) -> list[str]:
    """The decoded completions, each cut where its first stop string begins."""
    stop = kw.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    texts = [model.tokenizer.decode(t) for t in generate(model, prompts, max_new_tokens, **kw)]
    return [t[:cut] if (cut := first_stop(t, stop)) is not None else t for t in texts]

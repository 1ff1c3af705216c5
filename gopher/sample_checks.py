"""What a sampling call is checked against before anything compiles: its arguments, and
the memory its cache and prompt pass need on the devices (gopher/sample.py calls both).

Shape glossary: B rows, H heads, S cache length (padded prompt + new tokens), V vocabulary.
"""

from __future__ import annotations

import math
import operator

import jax.numpy as jnp
import numpy as np

from gopher.config import ModelConfig
from gopher.inference import LoadedModel

# The prompt runs through the model in passes of at most this many positions, so its
# attention temporaries grow with the prompt, not with its square: [B, H, chunk, S].
PREFILL_CHUNK = 512


def compute_dtype_of(model: LoadedModel):
    """The dtype `model.apply` computes in: the model's own record of it, else the run's
    precision policy, else the params'."""
    if model.compute_dtype is not None:
        return model.compute_dtype
    if model.train_cfg is not None:
        from gopher.precision import get_policy

        return get_policy(model.train_cfg.precision).compute_dtype
    return model.params["lm"]["embeddings"].dtype


def decode_bytes(
    cfg: ModelConfig, rows: int, prompt_len: int, new_tokens: int, dtype, keep_logits=False
) -> int:
    """The bytes the decode loop holds over all devices while it runs: the key/value
    cache and the projected relative encodings of every position, the output (and kept
    logits), and the prompt pass's attention temporaries, five fp32 [B, H, chunk, S]
    arrays (content and position scores, their sum, the probabilities; XLA CPU's
    compiled temporaries were 2.4-4.2 of them for the tiny preset at 1-4 rows and
    prompts of 1,024-4,096).
    """
    length = prompt_len + new_tokens
    hk_bytes = cfg.num_heads * cfg.key_size * jnp.dtype(dtype).itemsize
    cache = 2 * cfg.num_layers * rows * length * hk_bytes
    encodings = cfg.num_layers * length * hk_bytes
    out = rows * new_tokens * (4 + (4 * cfg.vocab_size if keep_logits else 0))
    prefill = 5 * rows * cfg.num_heads * min(prompt_len, PREFILL_CHUNK) * length * 4
    return cache + encodings + out + prefill


def check_memory(
    model: LoadedModel,
    rows: int,
    prompt_len: int,
    max_new_tokens: int,
    dtype=None,
    keep_logits: bool = False,
    name: str = "max_new_tokens",
) -> None:
    """ValueError (one line, naming `name` and the most that fits) when decoding
    `max_new_tokens` after prompts of `prompt_len` tokens cannot fit in memory, or its
    positions do not fit int32. Runs before anything compiles."""
    from gopher.engine import available_bytes_per_device

    if prompt_len + max_new_tokens >= 2**31 - 1:
        raise ValueError(
            f"{name}={max_new_tokens} after a prompt of {prompt_len} tokens passes 2**31 "
            f"positions; pass at most {2**31 - 2 - prompt_len}"
        )
    dtype = jnp.dtype(dtype or compute_dtype_of(model))
    devices = model.mesh.devices.size
    need = decode_bytes(model.model_cfg, rows, prompt_len, max_new_tokens, dtype, keep_logits)
    have = available_bytes_per_device(free=True)  # the parameters are on the devices
    if have is None or need / devices <= have:
        return
    fixed = decode_bytes(model.model_cfg, rows, prompt_len, 0, dtype, keep_logits)
    per_token = decode_bytes(model.model_cfg, rows, prompt_len, 1, dtype, keep_logits) - fixed
    most = max(0, int((have * devices - fixed) // max(per_token, 1)))
    gib = 2.0**30
    raise ValueError(
        f"{name}={max_new_tokens} needs at least {need / devices / gib:.1f} GiB per device "
        f"(key/value cache and attention of {rows} rows x {prompt_len + max_new_tokens} "
        "positions) but "
        f"{have / gib:.1f} GiB is available; pass {name} of at most {most}"
    )


def _whole(value) -> int | None:
    """`value` as an int when it is a whole number of any integer type, else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_prompt_kinds(prompts) -> None:
    """One-line ValueError unless `prompts` is a sequence of prompts, each a string or a
    sequence of token ids: a bare string would be a batch of one-character prompts, and
    one list of ids a TypeError deep in the padding."""
    if isinstance(prompts, str):
        shown = prompts if len(prompts) <= 20 else prompts[:20] + "..."
        raise ValueError(
            f"prompts is one string ({shown!r}); pass a list of prompts, e.g. [prompt]"
        )
    kinds = [isinstance(p, str) or np.ndim(p) == 1 for p in prompts]
    if kinds and not any(kinds) and all(_whole(p) is not None for p in prompts):
        raise ValueError("prompts is one list of token ids; pass a list of prompts, e.g. [ids]")
    for i, (p, ok) in enumerate(zip(prompts, kinds, strict=True)):
        if not ok:
            raise ValueError(f"prompt {i} is {p!r}, not a string or a list of token ids")


def check_arguments(model, prompts, max_new_tokens, temperature, top_k, top_p, stop, seed, eos_id):
    """One-line ValueErrors naming a bad argument; returns (max_new_tokens, top_k, seed)
    as ints (top_k at most the vocabulary: more keeps every token the same)."""
    v = model.model_cfg.vocab_size
    n = _whole(max_new_tokens)
    if n is None or n < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens!r}; pass a whole number >= 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature = {temperature}; pass a finite number >= 0 (0 means greedy)")
    if 0 < temperature < np.finfo(np.float32).tiny:
        raise ValueError(
            f"temperature = {temperature} is below float32's smallest normal number "
            f"({np.finfo(np.float32).tiny:.3g}), which divides as 0; pass 0 for greedy"
        )
    k = _whole(top_k)
    if k is None or k < 0:
        raise ValueError(f"top_k = {top_k!r}; pass a whole number >= 0 (0 keeps every token)")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p = {top_p}; pass a probability in (0, 1] (1 keeps every token)")
    seed_int = _whole(seed)
    if seed_int is None or not -(2**63) <= seed_int < 2**63:
        raise ValueError(f"seed = {seed!r}; pass a whole number in [-2**63, 2**63)")
    if eos_id is not None and (_whole(eos_id) is None or not -1 <= _whole(eos_id) < v):
        raise ValueError(f"eos_id = {eos_id!r}; pass a token id in [0, {v}), or -1 for none")
    if any(not s for s in stop):
        raise ValueError(f"stop strings {list(stop)!r} include an empty one; drop it")
    if len(prompts) == 0:
        raise ValueError("no prompts; pass at least one (a string or a list of token ids)")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} has no tokens; give it at least one")
        bad = [t for t in p if not 0 <= t < v]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:3]} outside [0, {v}); re-encode it")
    return n, min(k, v), seed_int

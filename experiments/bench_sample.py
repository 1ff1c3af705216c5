"""Per-token time of cached decoding vs rerunning the full model: `python -m experiments.bench_sample`.

The 44m shape (random init, fp32), batch 1, a prompt of --context tokens, greedy:
- cached: gopher.sample.generate, timed for 1 token (the prompt's pass) and for
  1 + --new_tokens; per token = the difference / --new_tokens;
- full: the model's forward pass, jitted once at the fixed padded length context +
  new_tokens, rerun on the growing sequence (the next token is the argmax at the last
  real position); per token = the time of one such call, over --full_tokens calls.
Compile time is excluded from both (each runs once untimed first). The greedy tokens of
the two are compared. Writes --out (JSON) with the machine (lscpu model name, cores,
jax version). Run it at a quiet moment: the timings are wall-clock.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

from experiments import common

_PRESET = flags.DEFINE_string("preset", "44m", "Model shape (gopher/config.py PRESETS).")
_CONTEXT = flags.DEFINE_integer("context", 512, "Prompt tokens before decoding starts.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Cached decode steps timed.")
_FULL = flags.DEFINE_integer("full_tokens", 8, "Full-forward reruns timed.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats of each (the best is kept).")
_OUT = flags.DEFINE_string("out", "benchmarks/sample_speed.json", "Where to write the result.")


def machine() -> dict:
    import jax

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    fields = dict(
        (k.strip(), v.strip()) for k, v in (x.split(":", 1) for x in lscpu.splitlines() if ":" in x)
    )
    return {
        "cpu": fields.get("Model name", platform.processor()),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv):
    del argv
    for name, flag in (("context", _CONTEXT), ("new_tokens", _NEW), ("full_tokens", _FULL)):
        if flag.value < 1:
            common.fail(f"--{name}={flag.value}; pass a whole number >= 1")
    with common.user_errors(False):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from gopher import config, inference, sample
        from gopher.model import build_forward

        cfg = config.get_preset(_PRESET.value)
        context, new, full_n = _CONTEXT.value, _NEW.value, min(_FULL.value, _NEW.value)
        params = build_forward(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        model = inference.from_params(cfg, params, tokenizer=None)
        prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, context).tolist()

        def cached(n):
            return sample.generate(model, [prompt], n, greedy=True, eos_id=-1)[0]

        tokens = cached(1 + new)  # compiles
        cached(1)
        t_prefill = best_time(lambda: cached(1), _REPEATS.value)
        t_all = best_time(lambda: cached(1 + new), _REPEATS.value)
        cached_per_token = (t_all - t_prefill) / new

        length = context + new
        forward = jax.jit(model.apply)
        buf = np.zeros((model.batch_multiple, length), np.int32)

        def full():
            seq = list(prompt)
            for _ in range(full_n):
                buf[0, : len(seq)] = seq
                logits = forward(model.params, jax.device_put(buf, model.batch_sharding))
                seq.append(int(np.argmax(np.asarray(logits[0, len(seq) - 1]))))
            return seq[context:]

        full_tokens = full()  # compiles
        full_per_token = best_time(full, _REPEATS.value) / full_n

    result = {
        "what": (
            f"{cfg.name} fp32 random init, batch 1, greedy: per-token seconds of cached "
            f"decoding (tokens {context}..{context + new} of context) vs the full forward "
            f"jitted once at length {length} rerun on the growing sequence; compile excluded, "
            f"best of {_REPEATS.value}"
        ),
        "command": " ".join(["python -m experiments.bench_sample", *sys.argv[1:]]),
        "context": context,
        "new_tokens": new,
        "prefill_seconds": round(t_prefill, 4),
        "cached_seconds_per_token": round(cached_per_token, 5),
        "full_seconds_per_token": round(full_per_token, 4),
        "speedup": round(full_per_token / cached_per_token, 1),
        "greedy_tokens_agree": full_tokens == tokens[:full_n],
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))

"""Data pipeline speed: mixing + packing, tokens ready for the train step per second.

    python -m experiments.prepare_data --out=data/embedded --vocab_size=4096
    python -m experiments.bench_data --corpus=data/embedded
Without --corpus it builds a small stdlib-only corpus in a temporary directory first.
Writes benchmarks/data_speed.json. It also times the `tiny` model's own train step on
this machine (one device, fp32) and checks the pipeline feeds >= 10x that many tokens/s.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

from absl import app, flags

_CORPUS = flags.DEFINE_string("corpus", None, "Corpus directory (default: build a small one).")
_STEPS = flags.DEFINE_integer("steps", 200, "Steps to time per shape.")
_OUT = flags.DEFINE_string("out", "benchmarks/data_speed.json", "Where to write the results.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 5, "Timed tiny train steps.")

# (name, global batch, seq_len): the tiny preset's shape and the 44M row's (0.25M tokens).
SHAPES = (("tiny", 16, 256), ("44m", 128, 2048))


def _small_corpus(directory: str) -> str:
    from gopher.data import build, corpus

    documents, records = corpus.embedded_documents(
        ["code", "technical"], cache_dir=directory, offline=True, log=lambda _: None
    )
    build.build_corpus(
        directory,
        documents,
        records,
        {"code": 0.3, "technical": 0.7},
        vocab_size=4096,
        max_bytes_per_source=4_000_000,
        log=lambda _: None,
    )
    return directory


def measure(corpus_dir: str, batch_size: int, seq_len: int, steps: int) -> dict:
    from gopher.data.mixture import Mixture

    mixture = Mixture.from_corpus(corpus_dir, None, batch_size, seq_len, 0, 0, 1)
    for _ in range(5):  # warm the page cache and the permutation code paths
        mixture.next()
    start = time.perf_counter()
    for _ in range(steps):
        batch = mixture.next()
    seconds = time.perf_counter() - start
    assert batch.shape == (batch_size, seq_len + 1)
    tokens = steps * batch_size * seq_len  # target tokens, as training counts them
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds),
        "ms_per_step": round(1000 * seconds / steps, 3),
    }


def measure_tiny_training(steps: int) -> float:
    """Tokens/s of the tiny preset's jitted fp32 train step at B=16, T=256 here."""
    import jax
    import numpy as np

    from gopher import config, train

    model = config.get_preset("tiny")
    fns = train.make_train_functions(model, config.TrainConfig(steps=100, warmup_steps=10))
    step = jax.jit(fns.train_step, donate_argnums=0)
    state = fns.init(jax.random.key(0))
    batch = np.random.default_rng(0).integers(0, model.vocab_size, (16, model.seq_len + 1))
    batch = batch.astype(np.int32)
    for _ in range(2):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return steps * 16 * model.seq_len / (time.perf_counter() - start)


def main(argv):
    del argv
    tiny_tps = measure_tiny_training(_TRAIN_STEPS.value)
    print(f"tiny model trains at {tiny_tps:,.0f} tokens/s here (jit, fp32, B=16, T=256)")
    with tempfile.TemporaryDirectory() as tmp:
        corpus_dir = _CORPUS.value or _small_corpus(tmp)
        with open(os.path.join(corpus_dir, "manifest.json")) as f:
            manifest = json.load(f)
        results = {}
        for name, batch_size, seq_len in SHAPES:
            r = measure(corpus_dir, batch_size, seq_len, _STEPS.value)
            results[name] = r
            line = f"{name:>5}: B={batch_size} T={seq_len}: {r['tokens_per_s']:,} tokens/s"
            line += f" ({r['ms_per_step']} ms/step)"
            if name == "tiny":
                r["ratio_to_tiny_training"] = round(r["tokens_per_s"] / tiny_tps, 1)
                line += (
                    f", {r['ratio_to_tiny_training']}x the tiny model's measured "
                    f"{tiny_tps:,.0f} training tokens/s (needs >= 10x)"
                )
            print(line)
    record = {
        "command": "python -m experiments.bench_data " + " ".join(sys.argv[1:]),
        "what": "Mixture.next(): weighted source draw + packed window reads, one host",
        "corpus": {
            "name": manifest["name"],
            "sources": sorted(manifest["sources"]),
            "tokens": manifest["total"]["tokens"],
        },
        "tiny_training_tokens_per_s": round(tiny_tps),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "results": results,
    }
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"wrote {_OUT.value}")
    ok = results["tiny"]["ratio_to_tiny_training"] >= 10
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(app.run(main))

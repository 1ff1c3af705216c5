"""The host loop: data, jitted steps, progress, JSON-lines metrics, evaluation.

Side effects live here (files, clocks, progress bars); the numerics are the pure
functions of gopher/train.py. Like nanodo, the loop dispatches step N before it
reads step N-1's metrics, so the host never stalls the device to log.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable

import jax
import numpy as np
from tqdm import tqdm

from gopher import train as train_lib
from gopher.config import DataConfig, ModelConfig, TrainConfig
from gopher.data import Document, TokenDataset, Tokenizer, stdlib_documents, text_files
from gopher.data.sources import unigram_bits_per_byte


class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict) -> None:
        clean = {
            k: (float(v) if isinstance(v, (np.floating, np.integer)) else v)
            for k, v in record.items()
        }
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def load_documents(data: DataConfig, split: str) -> list[Document]:
    if data.source == "stdlib":
        return stdlib_documents(split, data.heldout_fraction)
    return text_files(list(data.paths), split=split, heldout_fraction=data.heldout_fraction)


def get_tokenizer(data: DataConfig, vocab_size: int, workdir: str, docs: Iterable[Document]):
    """The configured tokenizer, or one trained on the training documents into the workdir."""
    path = data.tokenizer_path or os.path.join(workdir, "tokenizer.model")
    if os.path.isfile(path):
        tok = Tokenizer.load(path)
    elif data.tokenizer_path:
        raise ValueError(f"tokenizer {path!r} does not exist; fix --config.data.tokenizer_path")
    else:
        tok = Tokenizer.train(
            (d.text for d in docs), vocab_size, path, sample_bytes=data.tokenizer_sample_bytes
        )
    if tok.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer {path!r} has {tok.vocab_size} pieces but the model's vocab_size is "
            f"{vocab_size}; set --config.model.vocab_size={tok.vocab_size} or use another tokenizer"
        )
    return tok


def evaluate(eval_fn, params, windows) -> dict:
    """Held-out loss (nats per token) and bits per byte over [(batch, target bytes)]."""
    nll_sum, tokens, num_bytes = 0.0, 0, 0
    for batch, target_bytes in windows:
        nll = np.asarray(eval_fn(params, batch)["nll"], np.float64)
        nll_sum += float(nll.sum())
        tokens += nll.size
        num_bytes += target_bytes
    if tokens == 0:
        return {}
    return {"loss": nll_sum / tokens, "bpb": nll_sum / (math.log(2) * num_bytes)}


def run(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    workdir: str,
    show_progress: bool = True,
) -> dict:
    """Trains for train_cfg.steps; returns the last train and eval metrics."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "model": dataclasses.asdict(model_cfg),
                "train": dataclasses.asdict(train_cfg),
                "data": dataclasses.asdict(data_cfg),
            },
            f,
            indent=2,
            sort_keys=True,
        )
    say = tqdm.write if show_progress else print

    train_docs = load_documents(data_cfg, "train")
    heldout_docs = load_documents(data_cfg, "heldout")
    tokenizer = get_tokenizer(data_cfg, model_cfg.vocab_size, workdir, train_docs)
    cache = data_cfg.cache_dir or os.path.join(workdir, "data")
    train_ds = TokenDataset.from_documents(tokenizer, train_docs, train_cfg.seed, cache)
    heldout_ds = TokenDataset.from_documents(tokenizer, heldout_docs, train_cfg.seed, cache)
    b, t = train_cfg.batch_size, model_cfg.seq_len
    # The baseline is scored on exactly the held-out windows the model is scored on.
    eval_windows = list(heldout_ds.eval_batches(b, t, train_cfg.eval_batches))
    if not eval_windows:
        raise ValueError(
            f"the held-out split has {heldout_ds.num_tokens} tokens, fewer than one eval batch "
            f"of {b} x {t}; raise --config.data.heldout_fraction or lower the batch size"
        )
    unigram = unigram_bits_per_byte(
        train_ds.tokens,
        np.concatenate([w[:, 1:].ravel() for w, _ in eval_windows]),
        sum(n for _, n in eval_windows),
        tokenizer.vocab_size,
    )
    say(
        f"data: {len(train_docs)} train docs ({train_ds.num_tokens:,} tokens), "
        f"{len(heldout_docs)} held-out docs ({heldout_ds.num_tokens:,} tokens); "
        f"unigram baseline {unigram:.3f} bits/byte"
    )

    fns = train_lib.make_train_functions(
        model_cfg, train_cfg, precision=train_cfg.precision, remat=train_cfg.remat
    )
    state = jax.jit(fns.init)(jax.random.key(train_cfg.seed))
    step_fn = jax.jit(fns.train_step, donate_argnums=0)
    eval_fn = jax.jit(fns.eval_step)
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
    writer.write({"step": 0, "kind": "baseline", "heldout_unigram_bpb": unigram})

    last_train, last_eval = {}, {}
    pending = None  # (step, metrics on device) of the last logged step, read one step late
    clock = {"step": 0, "time": time.perf_counter()}  # last point tokens/s was measured from
    bar = tqdm(total=train_cfg.steps, disable=not show_progress, dynamic_ncols=True)

    def restart_clock(step):
        clock.update(step=step, time=time.perf_counter())

    def flush(step, metrics):
        nonlocal last_train
        rec = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for `step`
        now = time.perf_counter()
        tps = b * t * (step - clock["step"]) / max(now - clock["time"], 1e-9)
        restart_clock(step)
        rec.update(step=step, kind="train", tokens_per_sec=tps)
        writer.write(rec)
        last_train = rec
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}")

    for step in range(1, train_cfg.steps + 1):
        batch = train_ds.batch_at(step, b, t)
        state, metrics = step_fn(state, batch)
        if pending is not None:  # step-1 or earlier: reading it now does not stall step
            flush(*pending)
            pending = None
        if step == 1:  # the first step includes compilation: measure speed after it
            jax.block_until_ready(metrics)
            restart_clock(step)
        if step % train_cfg.log_every == 0 or step == train_cfg.steps:
            pending = (step, metrics)
        bar.update(1)
        if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
            if pending is not None:
                flush(*pending)
                pending = None
            ev = evaluate(eval_fn, state.params, eval_windows)
            if ev:
                last_eval = {
                    "step": step,
                    "kind": "eval",
                    "heldout_loss": ev["loss"],
                    "heldout_bpb": ev["bpb"],
                    "heldout_unigram_bpb": unigram,
                }
                writer.write(last_eval)
                say(f"step {step}: held-out {ev['bpb']:.3f} bits/byte (unigram {unigram:.3f})")
            restart_clock(step)
    if pending is not None:
        flush(*pending)
    bar.close()
    writer.close()
    return {"train": last_train, "eval": last_eval, "unigram_bpb": unigram, "state": state}

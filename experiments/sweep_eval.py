"""Evaluating a finished sweep run, and its result file: held-out bits per byte per
document and source, the zero-shot tasks, and the loss curve from the run's own log.

Held-out text: the first `eval.heldout_docs` documents of each source, each cut to
`eval.doc_bytes` (`cut_document`: before the last whitespace that fits, never mid-word).
A whole document is scored as [EOS] + text + [EOS]; a cut one has no closing EOS target
(gopher/evals/scoring.py, close=False): its end is not the document's, and charging the
model for predicting EOS there would bias every cut document's loss, by an amount that
differs across model sizes. Its bytes are those of the kept text.

A run's result is written once, atomically, beside its checkpoints (RESULT_FILE), keyed by
the run's digest, which covers what the run trains (its base config with the sweep's
overrides, less the fields a restart may change: RunSpec.train_digest) and how it is
evaluated (the sweep's `eval`: RunSpec.eval_digest, and this module's EVAL_METHOD).
`read_result` returns it only for the same run, so a changed recipe is trained again (the
trainer decides whether its checkpoints still serve), a changed evaluation is evaluated
again, and a torn write is redone; `stale_reason` says which changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from experiments.sweep_lib import RunSpec

RESULT_FILE = "sweep_result.json"
TRAIN_CHANGED = "its training config changed since its result was made"
EVAL_CHANGED = "its evaluation settings changed since its result was made"
UNKEYED = "its result predates results keyed by the run's config and eval settings"
# How evaluate_run scores, recorded in each result: a result made another way is evaluated
# again, as if the sweep's `eval` had changed. 2: a cut document ends before a whitespace
# and has no closing EOS target (1, unrecorded: cut at the byte, mid-word, with one).
EVAL_METHOD = 2
# What a task's result keeps of the harness's: the score, and what max_len cut or
# extrapolated (so a score over fewer items, or cut ones, shows in sweep_result.json).
TASK_KEYS = (
    "accuracy",
    "chance",
    "items",
    "skipped_items",
    "truncated_requests",
    "extrapolated_requests",
)


def cut_document(text: str, max_bytes: int) -> tuple[str, bool]:
    """(text, True) if it fits max_bytes UTF-8 bytes (or max_bytes is 0), else (its longest
    prefix that fits and ends before a whitespace character, its trailing whitespace
    dropped, False): a cut never splits a word. Without such a prefix (no whitespace in
    reach), the longest prefix of whole characters that fits."""
    data = text.encode("utf-8")
    if not max_bytes or len(data) <= max_bytes:
        return text, True
    fits = len(data[:max_bytes].decode("utf-8", errors="ignore"))  # characters that fit
    # text[fits] exists (the text is longer); a cut at i keeps text[:i], i <= fits.
    i = fits
    while i > 0 and not text[i].isspace():
        i -= 1
    kept = text[:i].rstrip()
    return (kept or text[:fits]), False


def heldout_texts(model_cfg, data_cfg, run_dir, docs: int, doc_bytes: int) -> dict:
    """{source: [(text, whole)]}: the first `docs` held-out documents, each cut to
    `doc_bytes` (cut_document; whole: False where it was cut)."""
    from gopher.data.pipeline import heldout_documents

    out = {}
    for source, group in heldout_documents(model_cfg, data_cfg, run_dir).items():
        texts = []
        for d in group[:docs] if docs else group:
            text, whole = cut_document(d.text, doc_bytes)
            if text:
                texts.append((text, whole))
        if texts:
            out[source] = texts
    return out


def score_heldout(scorer, texts: dict, window: int) -> dict:
    """Held-out bpb and loss, per source and per document, of heldout_texts' texts: each
    document its own stream in non-overlapping windows, a cut one without its closing EOS."""
    import numpy as np

    docs, by_source = [], {}
    total_nll = total_bytes = total_tokens = 0.0
    for source, group in texts.items():
        nll, count = scorer.text_nll(
            [t for t, _ in group], window=window, stride=window, close=[w for _, w in group]
        )
        nbytes = [len(t.encode("utf-8")) for t, _ in group]
        for i in range(len(group)):
            docs.append([source, float(nll[i]), int(count[i]), nbytes[i]])
        by_source[source] = float(np.sum(nll) / (math.log(2) * sum(nbytes)))
        total_nll += float(np.sum(nll))
        total_bytes += sum(nbytes)
        total_tokens += int(np.sum(count))
    return {
        "heldout_bpb": total_nll / (math.log(2) * total_bytes),
        "heldout_loss": total_nll / total_tokens,
        "heldout_tokens": int(total_tokens),
        "heldout_bytes": int(total_bytes),
        "bpb_by_source": by_source,
        "doc_losses": docs,  # [source, nll nats, tokens, bytes] per held-out document
    }


def evaluate_tasks(scorer, spec: str, limit: int) -> dict:
    """{task: its TASK_KEYS} of the sweep's `eval.tasks` (first `limit` items; 0: all)."""
    from gopher.evals import harness, tasks

    results = {}
    for name in tasks.parse_task_spec(spec) if spec else []:
        r = harness.evaluate_task(scorer, tasks.load_task(name, None, limit or None))
        results[name] = {k: r[k] for k in TASK_KEYS if k in r}
    return results


def evaluate_run(cfg, run: RunSpec, run_dir: str, say) -> dict:
    """Held-out bpb (per document and source) and task accuracies of a trained run."""
    import numpy as np

    from gopher import inference
    from gopher.evals.scoring import Scorer

    start = time.perf_counter()
    model = inference.load(run_dir)
    if model.step != run.steps:
        raise RuntimeError(
            f"run {run.name}: newest checkpoint is step {model.step}, not {run.steps}"
        )
    n_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(model.params))
    scorer = Scorer(model, batch_size=32)
    texts = heldout_texts(
        model.model_cfg, model.data_cfg, run_dir, cfg.eval.heldout_docs, cfg.eval.doc_bytes
    )
    heldout = score_heldout(scorer, texts, model.model_cfg.seq_len)
    results = evaluate_tasks(scorer, cfg.eval.tasks, cfg.eval.limit)
    train_log = _train_records(run_dir)
    return {
        "name": run.name,
        "digest": run.digest(),  # with train_digest and eval_digest, from the RunSpec
        "eval_method": EVAL_METHOD,
        "step": model.step,
        **{k: v for k, v in dataclasses.asdict(run).items() if k not in ("overrides", "skip")},
        "params_exact": n_params,
        **heldout,
        "tasks": results,
        "train_log": train_log,
        "eval_s": time.perf_counter() - start,
    }


def _number(value) -> float:
    return math.nan if value is None else value


def _train_records(run_dir: str) -> dict:
    """The run's loss curve and in-training evals, from its metrics.jsonl (last of each step)."""
    train, evals, seconds, last = {}, {}, 0.0, 0
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line a killed write tore: the rest still counts
                    continue
                # (metrics.jsonl writes a non-finite number as null: NaN here again)
                if rec.get("kind") == "eval":
                    evals[rec["step"]] = _number(rec["heldout_bpb"])
                elif rec.get("kind") == "train":
                    train[rec["step"]] = _number(rec["loss"])
                    # Each record's median step time stands for the steps since the last.
                    seconds += rec.get("step_time_s", 0.0) * max(rec["step"] - last, 0)
                    last = rec["step"]
    except (OSError, ValueError):
        pass
    return {
        "steps": sorted(train),
        "loss": [train[s] for s in sorted(train)],
        "eval_steps": sorted(evals),
        "eval_bpb": [evals[s] for s in sorted(evals)],
        "train_s": seconds,  # steps x step time, from the log (restarts' compiles excluded)
    }


def _load_result(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, RESULT_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None  # a torn write: evaluated again
    return result if isinstance(result, dict) else None


def _current(run: RunSpec, result: dict) -> bool:
    return result.get("digest") == run.digest() and result.get("eval_method") == EVAL_METHOD


def read_result(run: RunSpec, run_dir: str) -> dict | None:
    """The run's result, if it was made for what the run trains and evaluates now (its
    digest, and EVAL_METHOD)."""
    result = _load_result(run_dir)
    return result if result is not None and _current(run, result) else None


def stale_reason(run: RunSpec, run_dir: str) -> str:
    """Why the run's result file does not count ("" when it does, or there is none):
    TRAIN_CHANGED, UNKEYED (both go back to the trainer, which resumes the run if it is the
    same experiment: a no-op once it is done), or EVAL_CHANGED (trained as now: only the
    evaluation is redone; also for a result of another EVAL_METHOD)."""
    result = _load_result(run_dir)
    if result is None or _current(run, result):
        return ""
    if "train_digest" not in result:
        return UNKEYED
    return EVAL_CHANGED if result["train_digest"] == run.train_digest else TRAIN_CHANGED


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)

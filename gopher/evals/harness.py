"""Task metrics and text bits per byte from a Scorer, and the table they are shown in.

LAMBADA (kind "lambada"): each item's gold (context, final word) request. accuracy: the
share of items whose every final-word token is the greedy argmax;
perplexity_per_token: exp of the mean NLL per target token (it depends on the tokenizer);
perplexity_per_word: exp of the mean NLL per word (per item), the LAMBADA perplexity of
the GPT-2/GPT-3 papers and lm-evaluation-harness. Neither is called plain "perplexity":
the per-token value is far smaller, and quoting it as the published one misleads.

Multiple choice: every (context, continuation) of an item is scored and the highest
wins: accuracy by raw sum log-likelihood, acc_per_token by log-likelihood per
continuation token, acc_per_byte by log-likelihood per continuation UTF-8 byte (ties go
to the first choice).

Items that do not fit: a request longer than the scorer's max_len loses the first tokens
of its context (lm-evaluation-harness's left truncation; counted in
`truncated_requests`); an item with a continuation longer than max_len on its own is
skipped whole, every choice of it (counted in `skipped_items`; its metrics, `items` and
`chance` are those of the items scored). Requests run at more tokens than the model's
training seq_len (relative attention extrapolating; lm-evaluation-harness would cut them
to the training length) are counted in `extrapolated_requests`, truncated ones included
when max_len > seq_len.

Text: bits per byte (gopher/evals/scoring.py) at windows of 1x, 1.5x and 2x the
model's seq_len, each with stride half its window: the model was trained at seq_len,
so the longer windows test relative attention's extrapolation. Its "chance" is the bpb
of a uniform distribution over the vocabulary. Each result records how it was made
(`window`, `stride`, `documents`, `streams: "per_document"`): the in-training held-out bpb
(gopher/loop.py) scores one packed stream in non-overlapping windows, its first
eval_batches batches only, so its targets have less context and it reads other text; the
two numbers are not interchangeable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from gopher.evals.scoring import Request, Scorer

WINDOW_FACTORS = (1.0, 1.5, 2.0)
# A task's metrics shown beside accuracy in the table, when it has them.
TASK_OTHER_METRICS = (
    "acc_per_token",
    "acc_per_byte",
    "perplexity_per_token",
    "perplexity_per_word",
)


def _choices(item) -> list[Request]:
    contexts, continuations = tuple(item.contexts), tuple(item.continuations)
    if len(contexts) != len(continuations) or not continuations:
        raise ValueError(
            f"item {item.doc_id} has {len(contexts)} contexts for {len(continuations)} "
            "continuations; give one context per choice"
        )
    if not 0 <= item.gold < len(continuations):
        raise ValueError(f"item {item.doc_id} has gold {item.gold} outside its choices")
    return [Request(c, k) for c, k in zip(contexts, continuations, strict=True)]


def lambada_metrics(scores) -> dict:
    """Metrics of the gold requests' scores (one per item)."""
    nll = np.array([-s.logprob for s in scores], dtype=np.float64)
    tokens = np.array([s.num_tokens for s in scores], dtype=np.float64)
    return {
        "accuracy": float(np.mean([s.greedy for s in scores])),
        "perplexity_per_token": float(math.exp(nll.sum() / tokens.sum())),
        "perplexity_per_word": float(math.exp(nll.mean())),
        "tokens_per_word": float(tokens.mean()),
    }


def multiple_choice_metrics(golds: Sequence[int], scores_per_item) -> dict:
    """Metrics of each item's choices' scores (a list per item) against its gold index."""
    hits = {"accuracy": [], "acc_per_token": [], "acc_per_byte": []}
    for gold, scores in zip(golds, scores_per_item, strict=True):
        lp = np.array([s.logprob for s in scores], dtype=np.float64)
        tokens = np.array([s.num_tokens for s in scores], dtype=np.float64)
        nbytes = np.array([max(s.num_bytes, 1) for s in scores], dtype=np.float64)
        hits["accuracy"].append(int(np.argmax(lp)) == gold)
        hits["acc_per_token"].append(int(np.argmax(lp / tokens)) == gold)
        hits["acc_per_byte"].append(int(np.argmax(lp / nbytes)) == gold)
    return {name: float(np.mean(h)) for name, h in hits.items()}


def evaluate_task(scorer: Scorer, task) -> dict:
    """The task's metrics, with its split, item count, chance and time taken."""
    if not task.items:
        raise ValueError(f"task {task.name!r} has no items; check its file or --limit")
    if task.kind not in ("lambada", "multiple_choice"):
        raise ValueError(
            f"task {task.name!r} has kind {task.kind!r}; use lambada or multiple_choice"
        )
    seq_len = scorer.model.model_cfg.seq_len
    start, before = time.perf_counter(), (scorer.timings.compile_s, scorer.timings.run_s)
    per_item = [_choices(item) for item in task.items]
    if task.kind == "lambada":  # the gold request only
        per_item = [
            [choices[item.gold]] for choices, item in zip(per_item, task.items, strict=True)
        ]
    flat = scorer.score_requests([r for choices in per_item for r in choices], skip_too_long=True)
    grouped, at = [], 0
    for choices in per_item:
        grouped.append(flat[at : at + len(choices)])
        at += len(choices)
    kept = [i for i, g in enumerate(grouped) if all(s is not None for s in g)]
    if not kept:
        longest = max(scorer.continuation_tokens(r) for c in per_item for r in c)
        raise ValueError(
            f"every item of task {task.name!r} has a continuation longer than max_len "
            f"{scorer.max_len} tokens; pass --max_len={longest} or more, or drop the task"
        )
    items = [task.items[i] for i in kept]
    grouped = [grouped[i] for i in kept]
    scores = [s for g in grouped for s in g]
    if task.kind == "lambada":
        metrics = lambada_metrics(scores)
        chance = float(task.chance)
    else:
        metrics = multiple_choice_metrics([item.gold for item in items], grouped)
        chance = float(np.mean([1.0 / len(item.continuations) for item in items]))
        if len(items) == len(task.items):
            chance = float(task.chance)
    return {
        **metrics,
        "chance": chance,
        "items": len(items),
        "split": task.split,
        "kind": task.kind,
        "truncated_requests": sum(1 for s in scores if s.truncated),
        "extrapolated_requests": sum(1 for s in scores if s.length > seq_len),
        "skipped_items": len(task.items) - len(items),
        "compile_s": scorer.timings.compile_s - before[0],
        "run_s": scorer.timings.run_s - before[1],
        "wall_s": time.perf_counter() - start,
    }


def evaluate_text(
    scorer: Scorer,
    texts: Sequence[str],
    factors: Sequence[float] = WINDOW_FACTORS,
    stride_fraction: float = 0.5,
) -> dict:
    """bpb of the texts (each its own stream) at windows of each factor x seq_len."""
    seq_len = scorer.model.model_cfg.seq_len
    start, before = time.perf_counter(), (scorer.timings.compile_s, scorer.timings.run_s)
    out: dict = {}
    for factor in factors:
        window = max(1, round(factor * seq_len))
        stride = max(1, int(window * stride_fraction))
        totals = scorer.bits_per_byte(texts, window, stride)
        key = "bpb" if factor == 1 else f"bpb_{factor:g}x"
        out[key] = totals["bpb"]
        out[f"window{'' if factor == 1 else f'_{factor:g}x'}"] = window
        out[f"stride{'' if factor == 1 else f'_{factor:g}x'}"] = stride
        # Every window scores the same targets: one count of tokens and bytes.
        out.update(tokens=totals["tokens"], bytes=totals["bytes"])
    vocab = scorer.model.tokenizer.vocab_size
    out["chance"] = out["tokens"] * math.log2(vocab) / out["bytes"]
    out.update(
        documents=len(texts),
        streams="per_document",  # vs the in-training eval's one packed stream
        split="heldout",
        compile_s=scorer.timings.compile_s - before[0],
        run_s=scorer.timings.run_s - before[1],
        wall_s=time.perf_counter() - start,
    )
    return out


def _fmt(value) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def markdown_table(results: dict) -> str:
    """One row per task or text: its headline metric, the others, and chance."""
    lines = [
        "| task | split | items | metric | value | other metrics | chance |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for name, r in results.items():
        if "bpb" in r:
            main, count = "bpb", f"{r['documents']} docs"
            others = [k for k in r if k.startswith("bpb_")]
        else:
            main, count = "accuracy", str(r["items"])
            others = [k for k in TASK_OTHER_METRICS if k in r]
        other = ", ".join(f"{k} {_fmt(r[k])}" for k in others)
        notes = [
            f"{k.replace('_', ' ')} {r[k]}"
            for k in ("truncated_requests", "extrapolated_requests", "skipped_items")
            if r.get(k)
        ]
        other = "; ".join(x for x in (other, ", ".join(notes)) if x)
        lines.append(
            f"| {name} | {r['split']} | {count} | {main} | {_fmt(r[main])} | {other} | "
            f"{_fmt(r['chance'])} |"
        )
    return "\n".join(lines)

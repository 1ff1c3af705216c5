"""Synthetic run records for the scaling tests, drawn from known laws (gopher/scaling.py
lists the record keys)."""

import math

import numpy as np

from gopher import scaling


def sweep(rng, sizes, alpha=0.3, nc=1e5, docs=200, doc_sigma=0.3, shared_sigma=0.5, seeds=1):
    """Token-matched runs with bpb_true = (nc / N)^alpha, and per-document NLLs: a difficulty
    shared by every run (shared_sigma) times run-specific noise (doc_sigma)."""
    nbytes = rng.integers(200, 4000, size=docs).astype(float)
    shared = shared_sigma * rng.standard_normal(docs)
    records = []
    for i, n in enumerate(sizes):
        for s in range(seeds):
            noise = doc_sigma * rng.standard_normal(docs)
            per_doc_bpb = (nc / n) ** alpha * np.exp(shared + noise)
            nll = per_doc_bpb * math.log(2) * nbytes
            records.append(
                {
                    "name": f"s{i}_seed{s}",
                    "budget": scaling.TOKEN_MATCHED,
                    "seed": s,
                    "params": 1.5 * n,
                    "nonembedding_params": n,
                    "tokens": 1e6,
                    "flops": 6 * 1.5 * n * 1e6,
                    "doc_nll": nll,
                    "doc_bytes": nbytes,
                    "doc_tokens": nbytes / 4,
                }
            )
    return records


def isoflop_records(budget, sizes, losses, flops):
    return [
        {
            "name": f"{budget}_{i}",
            "budget": budget,
            "params": n,
            "tokens": flops / (6 * n),
            "flops": flops,
            "heldout_bpb": float(loss),
        }
        for i, (n, loss) in enumerate(zip(sizes, losses, strict=True))
    ]

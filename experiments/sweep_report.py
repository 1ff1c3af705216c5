"""The sweep's report: results table, fits beside the published laws, plots.

Called by experiments/sweep.py once its runs are evaluated (or with --report_only). Writes
into the results dir:
  results.md, results.csv     one row per run (params, tokens, FLOPs, bpb per source, tasks)
  fits.md                     L(N) on the token-matched runs (Kaplan's form, non-embedding N),
                              L(N, D) over every run (Chinchilla's form, total N), IsoFLOP
                              minima; 95% bootstrap intervals over held-out documents (and
                              seeds / runs: see each note), L(N)'s t-interval over runs; the
                              published exponents beside them
  loss_vs_params.png, loss_vs_flops.png, isoflop.png, source_bpb.png, curves.png
  summary.json                the numbers above, for the README and for tests
With a `precisions` axis (experiments/configs/precision.py) the report is the ablation's
instead (experiments/precision_report.py: curves.png, heldout_curves.png, precision.md). A report replaces the whole previous one (REPORT_FILES): a figure it does
not draw is deleted, not left beside it.

`python -m experiments.sweep_report results/sweep_cpu/results.csv [--out=F]` refits a committed
results table from its per-run numbers alone (no held-out documents): L(N) with intervals over
runs, the IsoFLOP minima and the allocation exponent without each budget in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import numpy as np

from experiments import precision_report
from gopher import compute_optimal, plots, scaling, scaling_tables

# Every file write_report may write: each is deleted before a report is written.
REPORT_FILES = (
    "results.md",
    "results.csv",
    "fits.md",
    "summary.json",
    "loss_vs_params.png",
    "loss_vs_flops.png",
    "isoflop.png",
    "source_bpb.png",
    "curves.png",
    "heldout_curves.png",
    "precision.md",
)


def to_record(result: dict, budgets: dict) -> dict:
    """A sweep result as gopher.scaling's run record; `budgets`: the config's budgets by
    name (a token budget's runs are the TOKEN_MATCHED group, a compute budget's carry its
    FLOPs as budget_flops)."""
    docs = result.get("doc_losses") or []
    record = {
        k: result[k]
        for k in (
            "name",
            "seed",
            "params",
            "nonembedding_params",
            "tokens",
            "flops",
            "heldout_bpb",
            "heldout_loss",
            "bpb_by_source",
            "size",
            "precision",
            "train_log",
        )
        if k in result
    }
    budget = budgets[result["budget"]]
    record["budget"] = scaling.TOKEN_MATCHED if budget.tokens else result["budget"]
    record["budget_name"] = result["budget"]
    if not budget.tokens:
        record["budget_flops"] = float(budget.flops)
    record["evals"] = {t: v["accuracy"] for t, v in result.get("tasks", {}).items()}
    if docs:
        record["doc_nll"] = np.array([d[1] for d in docs], dtype=np.float64)
        record["doc_tokens"] = np.array([d[2] for d in docs], dtype=np.float64)
        record["doc_bytes"] = np.array([d[3] for d in docs], dtype=np.float64)
    return record


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def write_report(cfg, runs, results, results_dir: str, say, workdir: str | None = None) -> dict:
    os.makedirs(results_dir, exist_ok=True)
    for name in REPORT_FILES:  # the previous report's, whether or not this one redraws it
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(results_dir, name))
    budgets = {b.name: b for b in cfg.budgets}
    records = [to_record(r, budgets) for r in results]
    scaling_tables.write_results_csv(records, os.path.join(results_dir, "results.csv"))
    table = scaling_tables.results_markdown(records)
    _write(os.path.join(results_dir, "results.md"), table)
    if len(tuple(cfg.get("precisions", ()))) > 1:
        summary = precision_report.report(cfg, records, results_dir, say, workdir)
    else:
        summary = scaling_report(cfg, records, results_dir, say)
    summary["runs"] = len(records)
    summary["planned"] = len([r for r in runs if not r.skip])
    summary["train_s"] = sum(r.get("train_log", {}).get("train_s", 0.0) for r in records)
    with open(os.path.join(results_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    say(f"report: {results_dir} ({len(records)} runs)")
    return summary


# ------------------------------------------------------------------ the model-size sweep


def scaling_report(cfg, records, results_dir: str, say) -> dict:
    out: dict = {}
    fits = {}
    token_matched = [r for r in records if r["budget"] == scaling.TOKEN_MATCHED]
    path = lambda name: os.path.join(results_dir, name)  # noqa: E731
    if len({r["nonembedding_params"] for r in token_matched}) >= 2:
        ordered = sorted(token_matched, key=lambda r: r["params"])
        losses = [r["heldout_bpb"] for r in ordered]
        out["token_matched_monotone"] = bool(
            all(a > b for a, b in zip(losses, losses[1:], strict=False))
        )
        out["token_matched_bpb"] = {r["name"]: r["heldout_bpb"] for r in ordered}
        for key in ("nonembedding_params", "params"):
            boot = scaling.bootstrap_power_law(token_matched, key=key, metric="loss", n_boot=1000)
            fits[key] = boot
            out[f"alpha_{key}"] = _iv(boot.alpha)
            if boot.alpha_runs is not None:
                out[f"alpha_{key}_runs"] = _iv(boot.alpha_runs)
        plots.plot_loss_vs_params(
            token_matched,
            path("loss_vs_params.png"),
            fit=fits["nonembedding_params"],
            title=f"Token-matched ({_tokens(token_matched)} tokens): held-out loss vs size",
        )
        plots.plot_source_bpb(
            token_matched,
            path("source_bpb.png"),
            title="Held-out bits per byte by source (token-matched runs)",
        )
        plots.plot_loss_curves(
            plots.record_curves(token_matched),
            path("curves.png"),
            x="tokens",
            y="bpb",
            title="In-training held-out bpb (token-matched runs)",
        )
    plots.plot_loss_vs_flops(records, path("loss_vs_flops.png"))
    minima = compute_optimal.isoflop_minima(records, key="params", metric="loss")
    if minima:
        plots.plot_isoflop(minima, path("isoflop.png"), key="params", metric="loss")
        out["isoflop"] = [
            {
                "budget": m.budget,
                "flops": m.flops,
                "u_shaped": m.u_shaped,
                "n_opt": m.n_opt,
                "loss_opt": m.loss_opt,
                "tokens_opt": m.tokens_opt,
                "sizes": m.sizes.tolist(),
                "losses": m.losses.tolist(),
            }
            for m in minima
        ]
    allocation = None
    try:
        allocation = compute_optimal.fit_allocation(minima)
        out["allocation_a"] = allocation.a
        out["allocation_a_leave_one_out"] = list(allocation.a_leave_one_out)
    except ValueError as e:
        out["allocation_note"] = str(e)
    chinchilla = None
    if len(records) >= 5:
        chinchilla = compute_optimal.bootstrap_chinchilla(
            records, key="params", metric="loss", n_boot=200
        )
        out["chinchilla"] = {k: _iv(v) for k, v in chinchilla.intervals.items()}
    text = scaling_tables.fits_markdown(
        fits.get("nonembedding_params"), chinchilla, allocation, allocation_key="params"
    )
    if "params" in fits:
        text += (
            "\n\nL(N) on total parameters (embedding included): alpha "
            f"{scaling_tables.alpha_text(fits['params'])}."
        )
    _write(path("fits.md"), text)
    say(text)
    return out


def _tokens(records) -> str:
    tokens = sorted({r["tokens"] for r in records})
    return f"{tokens[0] / 1e6:.2g}M" if len(tokens) == 1 else "equal"


def _iv(iv: scaling.Interval) -> dict:
    return {"point": iv.point, "median": iv.median, "low": iv.low, "high": iv.high}


# ------------------------------------------------- refitting a committed results table


def records_from_csv(path: str) -> list[dict]:
    """A results.csv (one row per run, as write_report writes it) as run records: per-run
    metrics only, no held-out documents."""
    import csv

    numeric = ("seed", "params", "nonembedding_params", "tokens", "flops")
    numeric += ("heldout_bpb", "heldout_loss")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("name", "budget", *numeric) if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(
            f"{path!r} is not a sweep's results.csv (missing columns {missing or 'all'}); "
            "pass the results.csv a sweep report wrote"
        )
    records = [{**r, **{c: float(r[c]) for c in numeric}} for r in rows]
    for r in records:  # a compute budget's configured FLOPs (tables written since it was kept)
        if r.get("budget_flops"):
            r["budget_flops"] = float(r["budget_flops"])
        else:
            r.pop("budget_flops", None)
    return records


def refit_runs(records: list[dict], metric: str = "loss") -> str:
    """The fits that need only per-run numbers, as markdown: L(N) by least squares with its
    t-interval over runs (both parameter counts), and each IsoFLOP budget's minimum with
    the allocation exponent refit without each budget in turn."""
    lines = [
        f"Refit from each run's {scaling_tables.METRIC_WORDS[metric]} alone (no held-out "
        "documents): 95% t-intervals from the runs' scatter about the law.",
        "",
        "| fit | N counts | alpha | 95% over runs |",
        "|---|---|---|---|",
    ]
    token_matched = [r for r in records if r["budget"] == scaling.TOKEN_MATCHED]
    for key in ("nonembedding_params", "params"):
        if not token_matched:
            break
        n, _, loss = scaling.configuration_metrics(token_matched, key, metric)
        iv = scaling.slope_interval(np.log(n), np.log(loss))  # as bootstrap_power_law's
        if iv is None:  # under 3 sizes
            continue
        lines.append(
            f"| L(N) = (N_c / N)^alpha, token-matched | {scaling_tables.KEY_WORDS[key]} | "
            f"{iv.point:.4f} | [{iv.low:.4f}, {iv.high:.4f}] |"
        )
    minima = compute_optimal.isoflop_minima(records, key="params", metric=metric)
    if minima:
        lines += [
            "",
            "| budget | FLOPs | sizes | two lowest measured losses | U-shaped | N_opt |",
            "|---|---|---|---|---|---|",
        ]
        for m in minima:
            low = np.sort(m.losses)[:2]
            lines.append(
                f"| {m.budget} | {m.flops:.3g} | {len(m.sizes)} | "
                + ", ".join(f"{v:.4f}" for v in low)
                + f" | {'yes' if m.u_shaped else 'no'} | {m.n_opt:,.0f} |"
            )
        try:
            alloc = compute_optimal.fit_allocation(minima)
        except ValueError as e:
            lines += ["", f"IsoFLOP exponent: {e}."]
        else:
            span = max(m.flops for m in minima) / min(m.flops for m in minima)
            lines += [
                "",
                f"IsoFLOP exponent N_opt ∝ C^a: a = {alloc.a:.3f} over {len(alloc.budgets)} "
                f"budgets spanning {span:.1f}x in compute"
                + (
                    "; without each budget in turn: "
                    + ", ".join(f"{a:.3f}" for a in alloc.a_leave_one_out)
                    if alloc.a_leave_one_out
                    else ""
                )
                + ".",
            ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Refit a committed sweep's results.csv: L(N) with intervals over runs, "
        "IsoFLOP minima and the allocation exponent's sensitivity."
    )
    parser.add_argument(
        "csv", help="results.csv of a sweep report, e.g. results/sweep_cpu/results.csv"
    )
    parser.add_argument("--out", default="", help="Also write the markdown here.")
    parser.add_argument("--metric", default="loss", choices=scaling.METRICS)
    args = parser.parse_args(argv)
    try:
        text = refit_runs(records_from_csv(args.csv), args.metric)
    except OSError as e:
        print(
            f"error: cannot read {args.csv!r} ({e.strerror}); pass a sweep's results.csv",
            file=sys.stderr,
        )
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        _write(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

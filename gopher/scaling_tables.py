"""Results tables of a model-size sweep (CSV and markdown) and the fits beside published laws.

One row per run record (gopher/scaling.py lists the keys): name, budget, budget_flops, seed,
params, nonembedding_params, tokens, flops, heldout_bpb, heldout_loss, then bpb_<source> for every
source any run has, then eval_<task> for every task any run has (a task's value is its
"accuracy", or its "bpb" for a text task, when the record holds the harness's metric dict).
A value a run lacks is an empty cell.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from gopher import compute_optimal, scaling


@dataclasses.dataclass(frozen=True)
class PublishedLaw:
    """A published fit, in its own conventions (which N, which loss)."""

    name: str
    citation: str
    form: str
    parameter_count: str
    loss_unit: str
    alpha: float
    beta: float | None = None
    E: float | None = None
    A: float | None = None
    B: float | None = None
    Nc: float | None = None
    a: float | None = None  # N_opt ∝ C^a as published (None: beta / (alpha + beta) of the law)


KAPLAN_2020 = PublishedLaw(
    name="Kaplan et al. 2020",
    citation="Kaplan et al. 2020, Scaling Laws for Neural Language Models, arXiv:2001.08361, eq. 1.1",
    form="L(N) = (N_c / N)^alpha_N",
    parameter_count="non-embedding parameters",
    loss_unit="nats/token (WebText2, GPT-2 BPE), models trained to convergence",
    alpha=0.076,
    Nc=8.8e13,
    a=0.73,
)
HOFFMANN_2022 = PublishedLaw(
    name="Hoffmann et al. 2022 (Chinchilla)",
    citation="Hoffmann et al. 2022, Training Compute-Optimal Large Language Models, "
    "arXiv:2203.15556, eq. 10 (approach 3)",
    form="L(N, D) = E + A / N^alpha + B / D^beta",
    parameter_count="total parameters (embedding included)",
    loss_unit="nats/token (MassiveText, SentencePiece 32k)",
    alpha=0.34,
    beta=0.28,
    E=1.69,
    A=406.4,
    B=410.7,
)
BESIROGLU_2024 = PublishedLaw(
    name="Besiroglu et al. 2024 (Epoch refit)",
    citation="Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt, arXiv:2404.10102 "
    "(refit of the data read off Hoffmann et al.'s Figure 4)",
    form="L(N, D) = E + A / N^alpha + B / D^beta",
    parameter_count="total parameters (embedding included)",
    loss_unit="nats/token (MassiveText, SentencePiece 32k)",
    alpha=0.35,
    beta=0.37,
    E=1.82,
    A=482.01,
    B=2085.43,
)
PUBLISHED = (KAPLAN_2020, HOFFMANN_2022, BESIROGLU_2024)


BASE_COLUMNS = (
    "name",
    "budget",
    "budget_flops",  # a compute budget's configured FLOPs (empty for the token-matched)
    "seed",
    "params",
    "nonembedding_params",
    "tokens",
    "flops",
    "heldout_bpb",
    "heldout_loss",
)
KEY_WORDS = {
    "params": "total parameters (tied embedding once)",
    "nonembedding_params": "non-embedding parameters",
}
METRIC_WORDS = {"bpb": "held-out bits/byte", "loss": "held-out nats/token"}


def _eval_value(value):
    if isinstance(value, dict):
        for name in ("accuracy", "bpb"):
            if name in value:
                return float(value[name])
        return None
    return None if value is None else float(value)


def result_columns(records: Sequence[dict]) -> list[str]:
    sources = sorted({s for r in records for s in r.get("bpb_by_source", {})})
    tasks = sorted({t for r in records for t in r.get("evals", {})})
    return [*BASE_COLUMNS, *(f"bpb_{s}" for s in sources), *(f"eval_{t}" for t in tasks)]


def result_rows(records: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """(columns, one dict per run) with numbers as numbers and missing values as None."""
    columns = result_columns(records)
    rows = []
    for r in records:
        row = {c: r.get(c) for c in BASE_COLUMNS}
        for source, bpb in r.get("bpb_by_source", {}).items():
            row[f"bpb_{source}"] = float(bpb)
        for task, value in r.get("evals", {}).items():
            row[f"eval_{task}"] = _eval_value(value)
        rows.append({c: row.get(c) for c in columns})
    return columns, rows


def _cell(value, markdown: bool) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return ""
    if isinstance(value, float):
        if not markdown:
            return repr(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4f}"
    return str(value)


def write_results_csv(records: Sequence[dict], path: str) -> str:
    """Writes the results table as CSV (floats in full precision); returns the path."""
    columns, rows = result_rows(records)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row[c], markdown=False) for c in columns])
    return path


def results_markdown(records: Sequence[dict]) -> str:
    """The results table as markdown (4 decimals, large counts in 3 significant figures)."""
    columns, rows = result_rows(records)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c], markdown=True) for c in columns) + " |")
    return "\n".join(lines)


def _interval(iv: scaling.Interval) -> str:
    return f"{iv.point:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def alpha_text(power_law: scaling.PowerLawBootstrap) -> str:
    """alpha [bootstrap 95%], and the interval over runs where the fit has one."""
    runs = power_law.alpha_runs
    extra = f"; runs [{runs.low:.3f}, {runs.high:.3f}]" if runs is not None else ""
    return _interval(power_law.alpha) + extra


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def _left_out(allocation) -> str:
    a = allocation.a_leave_one_out
    return f" ({min(a):.2f}-{max(a):.2f} without one budget)" if a else ""


def _interval_note(power_law, chinchilla, allocation) -> str:
    """What each interval resampled, as the fits recorded it."""
    parts = []
    if power_law is not None:
        what = " and ".join(power_law.resampled) or "nothing"
        text = f"L(N): 95% bootstrap over {what}"
        if power_law.alpha_runs is not None:
            text += (
                "; 'runs': the t-interval from the runs' scatter about the law (with one seed "
                "per size the bootstrap does not see the noise of training each model once)"
            )
        parts.append(text)
    if chinchilla is not None:
        parts.append(f"L(N, D): 95% bootstrap over {' and '.join(chinchilla.resampled)}")
    if allocation is not None:
        parts.append(
            "IsoFLOP exponent: a least-squares line through the minima, no interval"
            + (
                "; the range refits it without each budget in turn"
                if allocation.a_leave_one_out
                else ""
            )
        )
    return "Intervals: " + ". ".join(parts) + "." if parts else "Intervals: none."


def fits_markdown(
    power_law: scaling.PowerLawBootstrap | None = None,
    chinchilla: compute_optimal.ChinchillaBootstrap | None = None,
    allocation: compute_optimal.AllocationFit | None = None,
    allocation_key: str = "params",
    published: Sequence[PublishedLaw] = PUBLISHED,
) -> str:
    """The sweep's fits (point [2.5%, 97.5%] bootstrap) beside the published laws, each in
    its own conventions: which N it counts and which loss it fits."""
    header = (
        "| fit | form | N counts | loss | alpha | beta | E | A | B | N_opt ∝ C^a |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    if power_law is not None:
        law = power_law.fit
        if law.form == "kaplan":
            form = f"L = (N_c / N)^alpha, N_c = {law.coefficients['Nc']:.3g}"
        else:
            form = "L = E + A N^-alpha"
        e = law.coefficients.get("E")
        alpha = alpha_text(power_law)
        lines.append(
            f"| this sweep, L(N) | {form} | {KEY_WORDS.get(power_law.key, power_law.key)} | "
            f"{METRIC_WORDS[power_law.metric]} | {alpha} |  | "
            f"{_number(e)} | {_number(law.coefficients.get('A'))} |  |  |"
        )
    if chinchilla is not None:
        iv = chinchilla.intervals
        lines.append(
            f"| this sweep, L(N, D) | L = E + A/N^alpha + B/D^beta | "
            f"{KEY_WORDS.get(chinchilla.key, chinchilla.key)} | {METRIC_WORDS[chinchilla.metric]} | "
            f"{_interval(iv['alpha'])} | {_interval(iv['beta'])} | {_interval(iv['E'])} | "
            f"{_number(chinchilla.fit.A, 1)} | {_number(chinchilla.fit.B, 1)} | {_interval(iv['a'])} |"
        )
    if allocation is not None:
        lines.append(
            f"| this sweep, IsoFLOP minima ({len(allocation.budgets)} budgets) | "
            f"N_opt = k C^a | {KEY_WORDS.get(allocation_key, allocation_key)} |  |  |  |  |  |  | "
            f"{allocation.a:.3f}{_left_out(allocation)} |"
        )
    for p in published:
        a = p.a if p.a is not None else (p.beta / (p.alpha + p.beta) if p.beta else None)
        lines.append(
            f"| {p.name} | {p.form} | {p.parameter_count} | {p.loss_unit} | {p.alpha:.3f} | "
            f"{_number(p.beta)} | {_number(p.E, 2)} | {_number(p.A, 2)} | {_number(p.B, 2)} | "
            f"{_number(a, 2)} |"
        )
    notes = [
        "",
        _interval_note(power_law, chinchilla, allocation)
        + " Published rows: "
        + "; ".join(p.citation for p in published)
        + ".",
        "Published E, A, B are in nats/token of their own data and tokenizer; a bpb fit's are "
        "not comparable, only the exponents are.",
    ]
    return "\n".join(lines + notes)

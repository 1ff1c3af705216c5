"""Figures of a model-size sweep, each saved as a PNG (6.4 x 4.8 in at 120 dpi, Agg backend).

Inputs are the run records of gopher/scaling.py (its docstring lists their keys) and the fit
results of it and gopher/compute_optimal.py. matplotlib is imported inside each function, so
importing this module (and the sweep's non-plotting paths) does not need it.

Loss curves (plot_loss_curves) take one dict per run: "label" (its setting, e.g. "fp32"),
optionally "seed", and equal-length lists under the x key ("tokens" or "step") and the y key
("bpb" or "loss"); `record_curves` builds them from run records.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from gopher import compute_optimal, scaling

FIGSIZE = (6.4, 4.8)
DPI = 120
METRIC_LABELS = {
    "bpb": "held-out loss (bits per byte)",
    "loss": "held-out loss (nats per token)",
}
CURVE_LABELS = {"bpb": "loss (bits per byte)", "loss": "loss (nats per token)"}
KEY_LABELS = {
    "params": "parameters N (total, tied embedding once)",
    "nonembedding_params": "non-embedding parameters N",
}
X_LABELS = {
    "tokens": "training tokens",
    "step": "training step (updates)",
    "steps": "training step (updates)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes(title: str, xlabel: str, ylabel: str, logx: bool = True, logy: bool = False):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
        # Plain numbers. Over a narrow range (under 3x: a loss axis) every minor tick is
        # labelled; over a wider one, those at 2, 3 and 5 (the rest would overlap).
        from matplotlib.ticker import FuncFormatter

        def minor(value, _):
            low, high = ax.get_ylim()
            if high / max(low, 1e-30) < 3 or f"{value:.1e}"[0] in "235":
                return f"{value:.3g}"
            return ""

        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _save(fig, path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _label(key: str, table: dict) -> str:
    return table.get(key, key)


def _sci(value: float) -> str:
    return f"{value:.3g}".replace("e+0", "e").replace("e+", "e")


def _budget_name(budget: str, flops: float | None) -> str:
    """A group's legend entry: C = its FLOPs (configured_flops, IsoFlopMinimum.flops)."""
    if budget == scaling.TOKEN_MATCHED:
        return "token-matched"
    return f"C = {_sci(flops)} FLOPs" if flops else str(budget)


def _budget_groups(records: Sequence[dict]) -> list[tuple[str, float | None, list[dict]]]:
    """(label, configured FLOPs or None, runs) per budget group, by ascending FLOPs."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r.get("budget", "")), []).append(r)
    out = [
        (b, None if b == scaling.TOKEN_MATCHED else scaling.configured_flops(b, runs), runs)
        for b, runs in groups.items()
    ]
    return sorted(out, key=lambda g: (g[1] or math.inf, g[0]))


def plot_loss_vs_params(
    records: Sequence[dict],
    path: str,
    key: str | None = None,
    metric: str | None = None,
    fit: scaling.PowerLawBootstrap | scaling.PowerLawFit | None = None,
    title: str = "Held-out loss vs model size",
) -> str:
    """Runs by budget group (log-log) with the fitted power law and alpha's interval. key
    and metric default to the bootstrap's (else non-embedding parameters and bpb)."""
    boot = fit if isinstance(fit, scaling.PowerLawBootstrap) else None
    key = key or (boot.key if boot else "nonembedding_params")
    metric = metric or (boot.metric if boot else "bpb")
    scaling.check_metric(metric)
    fig, ax = _axes(title, _label(key, KEY_LABELS), METRIC_LABELS[metric], logy=True)
    for budget, flops, runs in _budget_groups(records):
        n = [scaling.record_value(r, key) for r in runs]
        ax.plot(
            n,
            [scaling.record_metric(r, metric) for r in runs],
            "o",
            label=_budget_name(budget, flops),
        )
    if fit is not None:
        law = fit.fit if isinstance(fit, scaling.PowerLawBootstrap) else fit
        all_n = [scaling.record_value(r, key) for r in records]
        grid = np.geomspace(min(all_n), max(all_n), 100)
        text = f"alpha = {law.alpha:.3f}"
        if isinstance(fit, scaling.PowerLawBootstrap):
            a = fit.alpha
            text += f" [{a.low:.3f}, {a.high:.3f}] (95% bootstrap, {len(a.samples)} replicates)"
        form = "(N_c / N)^alpha" if law.form == "kaplan" else "E + A N^-alpha"
        ax.plot(grid, law.predict(grid), "k--", lw=1.2, label=f"fit L = {form}")
        ax.annotate(text, xy=(0.03, 0.04), xycoords="axes fraction", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_vs_flops(
    records: Sequence[dict],
    path: str,
    key: str = "params",
    metric: str = "bpb",
    title: str = "Held-out loss vs training compute",
) -> str:
    """One curve per model size through its runs' (FLOPs, loss), coloured by N on a log
    scale (a colour bar, not a legend entry per size), and the compute frontier."""
    scaling.check_metric(metric)
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    fig, ax = _axes(title, "training compute (FLOPs)", METRIC_LABELS[metric])
    by_size: dict[float, list[dict]] = {}
    for r in records:
        by_size.setdefault(scaling.record_value(r, key), []).append(r)
    sizes = sorted(by_size)
    norm = LogNorm(sizes[0], sizes[-1] if sizes[-1] > sizes[0] else sizes[0] * 10)
    cmap = plt.get_cmap("viridis")
    for size in sizes:
        runs = sorted(by_size[size], key=lambda r: scaling.record_value(r, "flops"))
        flops = [scaling.record_value(r, "flops") for r in runs]
        losses = [scaling.record_metric(r, metric) for r in runs]
        ax.plot(flops, losses, "o-", ms=4, lw=1.2, color=cmap(norm(size)))
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    bar.set_label(_label(key, KEY_LABELS))
    frontier = compute_optimal.compute_frontier(records, metric)
    ax.plot(
        [scaling.record_value(r, "flops") for r in frontier],
        [scaling.record_metric(r, metric) for r in frontier],
        "k--",
        lw=1.5,
        label="compute frontier",
    )
    ax.plot([], [], "o-", color="gray", ms=4, label="one model size (colour: N)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_isoflop(
    minima: Sequence[compute_optimal.IsoFlopMinimum],
    path: str,
    key: str = "params",
    metric: str = "bpb",
    title: str = "IsoFLOP curves",
) -> str:
    """Loss vs N at each compute budget, its fitted parabola in log10 N, and its minimum."""
    scaling.check_metric(metric)
    plt = _pyplot()
    fig, ax = _axes(title, _label(key, KEY_LABELS), METRIC_LABELS[metric])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(minima):
        color = colors[i % len(colors)]
        ax.plot(m.sizes, m.losses, "o", color=color, label=_budget_name(m.budget, m.flops))
        if m.coefficients is not None:
            x = np.linspace(np.log10(m.sizes[0]), np.log10(m.sizes[-1]), 100)
            ax.plot(10**x, np.polyval(m.coefficients, x), "-", color=color, lw=1)
        if m.u_shaped:
            ax.plot(m.n_opt, m.loss_opt, "*", ms=14, color=color, mec="k")
        else:
            ax.plot(m.n_opt, m.loss_opt, "x", ms=10, color=color)
    ax.plot([], [], "*", ms=12, color="gray", mec="k", label="parabola minimum")
    if not all(m.u_shaped for m in minima):
        ax.plot([], [], "x", ms=9, color="gray", label="best run (no U shape)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_source_bpb(
    records: Sequence[dict],
    path: str,
    key: str = "nonembedding_params",
    title: str = "Held-out bits per byte by source",
) -> str:
    """One line per source of bpb vs N (pass one group's runs; seeds are averaged)."""
    fig, ax = _axes(title, _label(key, KEY_LABELS), "held-out loss (bits per byte)")
    sources = sorted({s for r in records for s in r.get("bpb_by_source", {})})
    if not sources:
        raise ValueError("no run has bpb_by_source; the runner must record per-source bpb")
    for source in sources:
        by_size: dict[float, list[float]] = {}
        for r in records:
            if source in r.get("bpb_by_source", {}):
                size = scaling.record_value(r, key)
                by_size.setdefault(size, []).append(float(r["bpb_by_source"][source]))
        sizes = sorted(by_size)
        ax.plot(sizes, [np.mean(by_size[s]) for s in sizes], "o-", ms=4, label=source)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_curves(
    curves: Sequence[dict],
    path: str,
    x: str = "tokens",
    y: str = "bpb",
    title: str = "Loss curves",
    logx: bool = False,
) -> str:
    """Curves by setting: seeds as thin lines; with 2+ seeds, their mean (thick) and range."""
    if not curves:
        raise ValueError("no curves to plot; give at least one run's curve")
    plt = _pyplot()
    fig, ax = _axes(title, _label(x, X_LABELS), _label(y, CURVE_LABELS), logx=logx)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(str(c.get("label", "")) for c in curves))
    for i, label in enumerate(labels):
        color = colors[i % len(colors)]
        group = [c for c in curves if str(c.get("label", "")) == label]
        for c in group:
            if x not in c or y not in c or len(c[x]) != len(c[y]):
                raise ValueError(
                    f"curve {label!r} needs equal-length {x!r} and {y!r} lists; "
                    f"it has keys {sorted(c)}"
                )
        if len(group) == 1:
            ax.plot(group[0][x], group[0][y], color=color, lw=1.8, label=label)
            continue
        for c in group:
            ax.plot(c[x], c[y], color=color, lw=0.7, alpha=0.45)
        # The seeds' mean and range on the first seed's x (others interpolated onto it).
        grid = np.asarray(group[0][x], dtype=np.float64)
        ys = np.array(
            [np.interp(grid, np.asarray(c[x], float), np.asarray(c[y], float)) for c in group]
        )
        ax.fill_between(grid, ys.min(0), ys.max(0), color=color, alpha=0.15)
        ax.plot(
            grid, ys.mean(0), color=color, lw=1.8, label=f"{label} (mean of {len(group)} seeds)"
        )
    ax.legend(fontsize=8)
    return _save(fig, path)


def record_curves(records: Sequence[dict], y: str = "bpb", label_key: str = "size") -> list[dict]:
    """The curves of plot_loss_curves from run records' "train_log": held-out bpb at its eval
    steps (y="bpb") or the training loss at its logged steps, labelled by `label_key`
    (the run's name when the record lacks it); runs without a log are left out."""
    curves = []
    for r in records:
        log = r.get("train_log") or {}
        batch_tokens = r["tokens"] / max(1, log.get("steps", [1])[-1] if log.get("steps") else 1)
        if y == "bpb" and log.get("eval_steps"):
            xs, ys = log["eval_steps"], log["eval_bpb"]
        elif log.get("steps"):
            xs, ys = log["steps"], log["loss"]
        else:
            continue
        curves.append(
            {
                "label": str(r.get(label_key, r["name"])),
                "tokens": [s * batch_tokens for s in xs],
                "steps": list(xs),
                y: list(ys),
            }
        )
    return curves

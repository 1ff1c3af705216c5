"""The precision ablation's report (experiments/configs/precision.py; Gopher App. C).

Written by experiments/sweep_report.py when the sweep has a `precisions` axis:
  curves.png, heldout_curves.png  training loss and held-out bpb by setting, seeds as thin lines
  precision.md                    final held-out bpb per setting over seeds (mean, spread, paired
                                  with fp32 seed by seed), and the size of the last Adam updates
                                  against half the bf16 spacing at each parameter
"""

from __future__ import annotations

import math
import os

import numpy as np

from gopher import plots


def report(cfg, records, results_dir: str, say, workdir: str | None = None) -> dict:
    """The ablation's report in `results_dir` (curves.png, heldout_curves.png, precision.md);
    with `workdir`, the size of each setting's last updates against bf16's spacing from
    its first seed's final checkpoint. Returns the summary's numbers."""
    path = lambda name: os.path.join(results_dir, name)  # noqa: E731
    order = list(cfg.precisions)
    curves = plots.record_curves(records, y="loss", label_key="precision")
    seeds = len(tuple(cfg.seeds))
    plots.plot_loss_curves(
        curves,
        path("curves.png"),
        x="steps",
        y="loss",
        title=f"Precision settings: training loss ({seeds} seed{'s' * (seeds > 1)} each)",
    )
    plots.plot_loss_curves(
        plots.record_curves(records, y="bpb", label_key="precision"),
        path("heldout_curves.png"),
        x="steps",
        y="bpb",
        title="Precision settings: held-out bits per byte during training",
    )
    by_setting: dict = {p: [r for r in records if r["precision"] == p] for p in order}
    rows = [
        "| setting | seeds | held-out bpb mean | std | min | max | vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    stats = {}
    base = np.mean([r["heldout_bpb"] for r in by_setting.get("fp32", [])] or [math.nan])
    for p, group in by_setting.items():
        if not group:
            continue
        v = np.array([r["heldout_bpb"] for r in group])
        stats[p] = {
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()),
            "max": float(v.max()),
            "seeds": len(v),
            "per_seed": {int(r["seed"]): float(r["heldout_bpb"]) for r in group},
        }
        s = stats[p]
        rows.append(
            f"| {p} | {len(v)} | {s['mean']:.4f} | {s['std']:.4f} | {s['min']:.4f} | "
            f"{s['max']:.4f} | {s['mean'] - base:+.4f} |"
        )
    ranking = sorted(stats, key=lambda p: stats[p]["mean"])
    text = "\n".join(rows) + "\n\nOrder (best first): " + " < ".join(ranking)
    if "fp32" in stats:  # same seed = same initial weights and data order: paired differences
        base_seeds = stats["fp32"]["per_seed"]
        text += "\n\nPaired with fp32 (same seed: same initial weights, same batches):\n\n"
        text += "| setting | bpb - fp32's, per seed | mean |\n|---|---|---|"
        for p, st in stats.items():
            diffs = {k: v - base_seeds[k] for k, v in st["per_seed"].items() if k in base_seeds}
            st["paired_vs_fp32"] = diffs
            cells = ", ".join(f"s{k} {d:+.4f}" for k, d in sorted(diffs.items()))
            text += f"\n| {p} | {cells} | {np.mean(list(diffs.values())):+.4f} |"
    spacing = {}
    if workdir:
        text += (
            "\n\nThe last step's Adam update against half the bf16 spacing at each parameter "
            "(the first seed's final checkpoint; below 1, round-to-nearest drops the update; "
            "stochastic rounding keeps it in expectation, an fp32 master copy exactly):\n\n"
            "| setting | last LR | updates below half a bf16 gap | median update / half-gap | "
            "norm scales' updates below it |\n|---|---|---|---|---|"
        )
        for p, group in by_setting.items():
            first = min(group, key=lambda r: r["seed"]) if group else None
            if first is None:
                continue
            s = update_spacing(os.path.join(workdir, "runs", first["name"]))
            spacing[p] = s
            text += (
                f"\n| {p} | {s['lr_last']:.2e} | {s['lost_fraction']:.1%} | "
                f"{s['median_ratio']:.3f} | {s.get('norm_lost_fraction', math.nan):.1%} |"
            )
    with open(path("precision.md"), "w") as f:
        f.write(text + "\n")
    say(text)
    return {"precision": stats, "ranking": ranking, "update_spacing": spacing}


def update_spacing(run_dir: str) -> dict:
    """How the run's last Adam update compares with the spacing of bf16 numbers.

    From the final checkpoint: the update of the last step, lr * m_hat / (sqrt(v_hat) + eps)
    (Adam's moments as saved, bias-corrected), against half the gap between the bf16
    neighbours of each parameter (2^(floor(log2 |p|) - 8)). An update below that half-gap
    is lost when the sum is rounded to nearest bf16; stochastic rounding keeps it in
    expectation; an fp32 master copy keeps it exactly. Reported over every parameter and
    for the norm scales apart (|p| ~ 1: the coarsest spacing).
    """
    import jax
    import optax

    from gopher import inference, optim

    run = inference.restore_state(run_dir)
    state, train_cfg, model_cfg = run.state, run.train_cfg, run.model_cfg
    adam = [
        s
        for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ]
    if not adam:
        raise ValueError(f"{run_dir}: no Adam state in the checkpoint")
    mu, nu, count = adam[0].mu, adam[0].nu, int(adam[0].count)
    lr = float(optim.learning_rate_schedule(model_cfg, train_cfg)(run.step - 1))
    b1, b2, eps = train_cfg.b1, train_cfg.b2, train_cfg.eps
    params = state.master if state.master is not None else state.params
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    ratios, norm_ratios = [], []
    for (path, p), m, v in zip(flat, jax.tree.leaves(mu), jax.tree.leaves(nu), strict=True):
        p = np.abs(np.asarray(p, dtype=np.float32)).ravel()
        m_hat = np.asarray(m, np.float64).ravel() / (1 - b1**count)
        v_hat = np.asarray(v, np.float64).ravel() / (1 - b2**count)
        update = lr * np.abs(m_hat) / (np.sqrt(v_hat) + eps)
        half_gap = np.exp2(np.floor(np.log2(np.maximum(p, 1e-30))) - 8)
        ratio = update / half_gap
        ratios.append(ratio)
        if "norm" in jax.tree_util.keystr(path).lower() or "scale" in jax.tree_util.keystr(path):
            norm_ratios.append(ratio)
    every = np.concatenate(ratios)
    out = {
        "lr_last": lr,
        "lost_fraction": float(np.mean(every < 1.0)),
        "median_ratio": float(np.median(every)),
        "params": int(every.size),
    }
    if norm_ratios:
        norms = np.concatenate(norm_ratios)
        out.update(norm_lost_fraction=float(np.mean(norms < 1.0)), norm_params=int(norms.size))
    del optax
    return out

"""The sweep's plots (gopher/plots.py) and tables (gopher/scaling_tables.py) on disk, from
synthetic runs."""

import csv

import numpy as np
import pytest
from sweep_records import isoflop_records, sweep  # tests/ is on sys.path

from gopher import compute_optimal, plots, scaling, scaling_tables

CHINCHILLA = scaling_tables.HOFFMANN_2022


# ----------------------------------------------------------------------------- plots, tables


def full_sweep():
    """Runs of three budgets and a token-matched group, with sources and evals."""
    fit = compute_optimal.ChinchillaFit(1.69, 406.4, 410.7, 0.34, 0.28, 0.0, np.zeros(0))
    records = []
    sizes = np.geomspace(2.5e6, 3.2e8, 8)  # every size at every budget
    for c in (1e16, 1e17, 1e18):
        records += isoflop_records(f"c{c:.0e}", sizes, fit.predict(sizes, c / (6 * sizes)), c)
    for r in records:
        r["nonembedding_params"] = r["params"] * 0.7
        r["bpb_by_source"] = {"web": r["heldout_bpb"] * 0.9, "books": r["heldout_bpb"] * 1.1}
        r["evals"] = {"lambada": {"accuracy": 0.1, "perplexity": 50.0}, "piqa": 0.55}
        r["seed"] = 0
    return records


def check_png(path):
    import matplotlib.pyplot as plt

    assert path.stat().st_size > 10_000
    image = plt.imread(str(path))
    assert image.shape == (576, 768, 4)  # 6.4 x 4.8 in at 120 dpi
    assert image[..., :3].std() > 0.05  # something drawn, not a blank canvas


def test_plots_write_readable_pngs(tmp_path, monkeypatch):
    records = full_sweep()
    tokens = sweep(np.random.default_rng(11), np.logspace(5, 8, 4), docs=30)
    for r in tokens:
        r["bpb_by_source"] = {"web": 1.0, "books": 1.2}
    boot = scaling.bootstrap_power_law(tokens, n_boot=50)
    minima = compute_optimal.isoflop_minima(records)
    steps = np.arange(0, 1000, 50)
    curves = [
        {
            "label": label,
            "seed": s,
            "step": steps,
            "bpb": 3 * np.exp(-steps / 400) + shift + 0.02 * s,
        }
        for label, shift in (("fp32", 1.0), ("bf16 + stochastic rounding", 1.05))
        for s in range(3)
    ] + [{"label": "bf16 no rounding", "step": steps, "bpb": 3 * np.exp(-steps / 400) + 1.2}]
    seen = []  # each figure's axes as it is saved: labels with units, a legend
    save = plots._save

    def record(fig, path):
        ax = fig.axes[0]
        seen.append((path, ax.get_xlabel(), ax.get_ylabel(), ax.get_legend() is not None))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    written = [
        plots.plot_loss_vs_params(tokens, str(tmp_path / "params.png"), fit=boot),
        plots.plot_loss_vs_flops(records, str(tmp_path / "flops.png")),
        plots.plot_isoflop(minima, str(tmp_path / "isoflop.png")),
        plots.plot_source_bpb(tokens, str(tmp_path / "sources.png")),
        plots.plot_loss_curves(curves, str(tmp_path / "sub" / "curves.png"), x="step"),
    ]
    for path in written:
        check_png(tmp_path / path)
    assert [p for p, *_ in seen] == written
    for path, xlabel, ylabel, legend in seen:
        assert xlabel and ylabel and legend, path
        # a unit in the labels: FLOPs, parameters, tokens, updates, bits or nats
        units = ("FLOPs", "parameters", "tokens", "updates", "bits", "nats")
        assert any(u in xlabel for u in units) and any(u in ylabel for u in units), (
            path,
            xlabel,
            ylabel,
        )
    with pytest.raises(ValueError, match="needs equal-length 'step' and 'bpb'"):
        plots.plot_loss_curves(
            [{"label": "x", "step": [1, 2]}], str(tmp_path / "bad.png"), x="step"
        )


def test_results_csv_round_trips(tmp_path):
    records = full_sweep()
    records[0].pop("bpb_by_source")  # a run without per-source bpb: empty cells
    path = scaling_tables.write_results_csv(records, str(tmp_path / "results.csv"))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert list(rows[0]) == [
        *scaling_tables.BASE_COLUMNS,
        "bpb_books",
        "bpb_web",
        "eval_lambada",
        "eval_piqa",
    ]
    for row, r in zip(rows, records, strict=True):
        assert row["name"] == r["name"] and row["budget"] == r["budget"]
        for key in ("params", "nonembedding_params", "tokens", "flops", "heldout_bpb"):
            assert float(row[key]) == r[key]  # full precision
        assert row["heldout_loss"] == ""
        assert float(row["eval_lambada"]) == 0.1 and float(row["eval_piqa"]) == 0.55
        if "bpb_by_source" in r:
            assert float(row["bpb_web"]) == r["bpb_by_source"]["web"]
    assert rows[0]["bpb_web"] == ""
    table = scaling_tables.results_markdown(records).splitlines()
    assert len(table) == len(records) + 2
    assert {line.count("|") for line in table} == {len(rows[0]) + 1}


def test_fits_markdown_sits_beside_published_laws():
    tokens = sweep(np.random.default_rng(12), np.logspace(5, 8, 4), docs=30)
    boot = scaling.bootstrap_power_law(tokens, n_boot=50)
    allocation = compute_optimal.fit_allocation(compute_optimal.isoflop_minima(full_sweep()))
    text = scaling_tables.fits_markdown(power_law=boot, allocation=allocation)
    iv = boot.alpha
    assert f"{iv.point:.3f} [{iv.low:.3f}, {iv.high:.3f}]" in text
    assert "| Kaplan et al. 2020 |" in text and "| 0.076 |" in text
    assert "| Hoffmann et al. 2022 (Chinchilla) |" in text and "| 406.40 | 410.70 |" in text
    assert "| 482.01 | 2085.43 |" in text
    assert f"| {allocation.a:.3f} (" in text and "without one budget" in text
    assert f"runs [{boot.alpha_runs.low:.3f}, {boot.alpha_runs.high:.3f}]" in text
    # The note says what each interval resampled (here: documents only, one seed a size).
    assert "L(N): 95% bootstrap over documents;" in text and "no interval" in text
    assert "non-embedding parameters" in text and "total parameters (embedding included)" in text


# ------------------------------------------------------------- the sweep's report of its runs


def _legends(monkeypatch):
    """Each figure's (path, x label, title, legend texts) as plots saves it."""
    seen = []
    save = plots._save

    def record(fig, path):
        ax = fig.axes[0]
        legend = ax.get_legend()
        texts = [t.get_text() for t in legend.get_texts()] if legend else []
        seen.append((path, ax.get_xlabel(), ax.get_title(), texts))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    return seen


def test_isoflop_compute_is_the_budgets_flops_not_its_name(tmp_path, monkeypatch):
    """Compute budgets named c1, c2, c3: their IsoFLOP minima sit at the FLOPs the config
    gives them (3e12, 1e13, 2e13), in the fit and in the plot's legend."""
    from experiments import sweep_lib, sweep_report
    from experiments.configs import sweep as sweep_configs

    cfg = sweep_configs.get_config("cpu")
    renamed = {"c3e12": "c1", "c1e13": "c2", "c2e13": "c3"}
    for b in cfg.budgets:
        b.name = renamed.get(b.name, b.name)
    for s in cfg.sizes:
        s.budgets = tuple(renamed.get(n, n) for n in s.budgets)
    runs = [r for r in sweep_lib.plan_runs(cfg) if not r.skip]
    law = compute_optimal.ChinchillaFit(1.69, 406.4, 410.7, 0.34, 0.28, 0.0, np.zeros(0))
    budgets = {b.name: b for b in cfg.budgets}
    records = []
    for r in runs:
        loss = float(law.predict(r.params, r.tokens))
        result = {**r.__dict__, "heldout_bpb": loss, "heldout_loss": loss, "tasks": {}}
        records.append(sweep_report.to_record(result, budgets))
    minima = compute_optimal.isoflop_minima(records, key="params", metric="loss")
    want = {b.name: b.flops for b in cfg.budgets if b.flops}
    assert {m.budget: m.flops for m in minima} == want
    # and refit from the results table the report writes (experiments.sweep_report's CLI)
    table = scaling_tables.write_results_csv(records, str(tmp_path / "results.csv"))
    refit = sweep_report.records_from_csv(table)
    refit_minima = compute_optimal.isoflop_minima(refit, key="params", metric="loss")
    assert {m.budget: m.flops for m in refit_minima} == want
    seen = _legends(monkeypatch)
    plots.plot_isoflop(minima, str(tmp_path / "isoflop.png"), key="params", metric="loss")
    legend = seen[-1][3]
    for flops in want.values():
        assert f"C = {plots._sci(flops)} FLOPs" in legend, legend


def test_precision_report_labels(tmp_path, monkeypatch):
    """The ablation's curves: x in training steps (updates), the title's seed count from
    the config; the update table says what it measures (below half a bf16 gap), not that
    the settings lost those updates."""
    from experiments import precision_report
    from experiments.configs import precision

    cfg = precision.get_config()
    cfg.seeds = (0, 1)
    records = []
    for i, p in enumerate(cfg.precisions):
        for seed in cfg.seeds:
            log = {"steps": [4, 8], "loss": [6.0, 5.0 + i], "eval_steps": [8], "eval_bpb": [3.0]}
            records.append(
                {
                    "name": f"c2_p256_{p}_s{seed}",
                    "precision": p,
                    "seed": seed,
                    "tokens": 8 * 4096,
                    "heldout_bpb": 3.0 + i / 10 + seed / 100,
                    "train_log": log,
                }
            )
    spacing = {
        "lr_last": 1e-4,
        "lost_fraction": 0.78,
        "median_ratio": 0.4,
        "norm_lost_fraction": 1.0,
    }
    monkeypatch.setattr(precision_report, "update_spacing", lambda run_dir: spacing)
    seen = _legends(monkeypatch)
    precision_report.report(cfg, records, str(tmp_path), lambda m: None, str(tmp_path))
    curves = {p.rsplit("/", 1)[-1]: (x, title) for p, x, title, _ in seen}
    for name in ("curves.png", "heldout_curves.png"):
        xlabel, title = curves[name]
        assert "updates" in xlabel, (name, xlabel)  # a unit, as every other figure has
    assert "2 seeds each" in curves["curves.png"][1]
    text = (tmp_path / "precision.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| setting | last LR"))
    assert "lost" not in header and "below half a bf16 gap" in header

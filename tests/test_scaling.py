"""Scaling-law fits against synthetic sweeps drawn from known laws; plots and tables on disk."""

import csv
import math

import numpy as np
import pytest

from gopher import compute_optimal, plots, scaling, scaling_tables

CHINCHILLA = scaling_tables.HOFFMANN_2022


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


# ----------------------------------------------------------------------------- L(N)


def test_power_law_recovers_kaplan_alpha():
    rng = np.random.default_rng(0)
    n = np.logspace(6, 9, 8)
    exact = (8.8e13 / n) ** 0.076
    fit = scaling.fit_power_law(n, exact)
    assert fit.alpha == pytest.approx(0.076, rel=1e-9)
    assert fit.coefficients["Nc"] == pytest.approx(8.8e13, rel=1e-6)
    assert np.abs(fit.residuals).max() < 1e-12
    noisy = scaling.fit_power_law(n, exact * np.exp(0.003 * rng.standard_normal(8)))
    assert noisy.alpha == pytest.approx(0.076, abs=0.003)
    np.testing.assert_allclose(noisy.predict(n), exact, rtol=0.01)


def test_power_law_with_offset_recovers_e_and_alpha():
    rng = np.random.default_rng(1)
    n = np.logspace(6, 10, 10)
    loss = (1.7 + 400 * n**-0.34) * np.exp(0.001 * rng.standard_normal(10))
    fit = scaling.fit_power_law(n, loss, with_offset=True)
    assert fit.form == "offset"
    assert fit.alpha == pytest.approx(0.34, abs=0.03)
    assert fit.coefficients["E"] == pytest.approx(1.7, abs=0.03)
    np.testing.assert_allclose(fit.predict(n), loss, rtol=0.004)


def test_power_law_bad_input_is_one_line():
    with pytest.raises(ValueError, match="3 values of N for 2 losses"):
        scaling.fit_power_law([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"N has values <= 0 \(\[-1.0\]\)"):
        scaling.fit_power_law([-1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="2 distinct N; a 3-parameter law needs 3"):
        scaling.fit_power_law([1, 1, 2], [3, 3, 2], with_offset=True)


def test_bootstrap_interval_covers_true_alpha():
    rng = np.random.default_rng(2)
    sizes = np.logspace(5, 8, 5)
    hits = 0
    for _ in range(40):
        result = scaling.bootstrap_power_law(
            sweep(rng, sizes), n_boot=200, seed=int(rng.integers(1e9))
        )
        hits += result.alpha.low <= 0.3 <= result.alpha.high
    assert result.resampled == ("documents",)
    # 95% intervals: 38 of 40 expected; fewer than 34 has probability under 1%.
    assert hits >= 34


def test_bootstrap_with_offset():
    rng = np.random.default_rng(13)
    sizes = np.logspace(5, 9, 6)
    records = sweep(rng, sizes, alpha=0.0, docs=100, doc_sigma=0.05)  # a flat law, rescaled:
    for r in records:  # each document's NLL times (E + A N^-alpha) / 1
        r["doc_nll"] = r["doc_nll"] * (0.8 + 60 * r["nonembedding_params"] ** -0.4)
    result = scaling.bootstrap_power_law(records, n_boot=30, with_offset=True)
    assert result.fit.form == "offset"
    assert result.alpha.point == pytest.approx(0.4, abs=0.05)
    assert result.alpha.low < result.alpha.point < result.alpha.high
    assert result.alpha.high - result.alpha.low < 0.2


def test_bootstrap_interval_shrinks_with_more_documents():
    rng = np.random.default_rng(3)
    sizes = np.logspace(5, 8, 5)
    widths = {}
    for docs in (50, 800):
        w = [
            scaling.bootstrap_power_law(sweep(rng, sizes, docs=docs), n_boot=200, seed=k).alpha
            for k in range(3)
        ]
        widths[docs] = np.mean([iv.high - iv.low for iv in w])
    # Width ~ 1/sqrt(documents): 16x the documents, a quarter of the width.
    assert widths[800] < 0.4 * widths[50]


def test_bootstrap_resamples_documents_jointly():
    # Only a shared per-document difficulty: every run's bpb moves by the same factor in a
    # joint replicate, so alpha does not move at all (resampling per run would move it).
    records = sweep(np.random.default_rng(4), np.logspace(5, 8, 4), doc_sigma=0.0, shared_sigma=1.0)
    result = scaling.bootstrap_power_law(records, n_boot=100)
    assert result.alpha.high - result.alpha.low < 1e-9
    assert result.alpha.point == pytest.approx(0.3, abs=1e-9)


def test_bootstrap_resamples_seeds():
    # Three seeds per size with log-normal seed noise sigma and no documents: the closed-form
    # standard error of the slope of the seed means is sigma / sqrt(3 * sum (x - mean x)^2);
    # a bootstrap of a mean of 3 has sqrt(2/3) of its spread (the plug-in variance).
    rng = np.random.default_rng(5)
    sizes, sigma = np.logspace(5, 8, 4), 0.02
    x = np.log(sizes)
    se = sigma / math.sqrt(3 * ((x - x.mean()) ** 2).sum())
    ratios = []
    for k in range(20):
        records = [
            {
                "name": f"s{i}_{s}",
                "seed": s,
                "budget": "tokens",
                "tokens": 1e6,
                "nonembedding_params": n,
                "heldout_bpb": (1e5 / n) ** 0.3 * math.exp(sigma * rng.standard_normal()),
            }
            for i, n in enumerate(sizes)
            for s in range(3)
        ]
        result = scaling.bootstrap_power_law(records, n_boot=300, seed=k)
        ratios.append(result.alpha.samples.std() / se)
    assert result.resampled == ("seeds",)
    assert len(result.n) == 4  # three seeds of each size are one configuration
    assert 0.65 < np.mean(ratios) < 0.95  # sqrt(2/3) = 0.82
    same = [dict(r, heldout_bpb=(1e5 / r["nonembedding_params"]) ** 0.3) for r in records]
    flat = scaling.bootstrap_power_law(same, n_boot=50).alpha
    assert flat.high - flat.low < 1e-12


def test_record_metrics_from_documents_and_bad_records():
    records = sweep(np.random.default_rng(6), [1e6, 1e7], docs=10)
    r = records[0]
    assert scaling.record_metric(r) == pytest.approx(
        r["doc_nll"].sum() / (math.log(2) * r["doc_bytes"].sum())
    )
    assert scaling.record_metric(r, "loss") == pytest.approx(
        r["doc_nll"].sum() / r["doc_tokens"].sum()
    )
    pairs = {"name": "p", "doc_losses": list(zip(r["doc_nll"], r["doc_bytes"], strict=True))}
    assert scaling.record_metric(pairs) == pytest.approx(scaling.record_metric(r))
    with pytest.raises(ValueError, match="'p' has no doc_tokens; use metric='bpb'"):
        scaling.record_metric(pairs, "loss")
    with pytest.raises(ValueError, match="metric 'ppl' is not one of"):
        scaling.record_metric(r, "ppl")
    shuffled = dict(records[1], doc_bytes=records[1]["doc_bytes"][::-1])
    with pytest.raises(ValueError, match="other held-out documents than 's0_seed0'"):
        scaling.bootstrap_power_law([records[0], shuffled, records[0]], n_boot=2)
    with pytest.raises(ValueError, match="'x' has no 'nonembedding_params'"):
        scaling.bootstrap_power_law([{"name": "x", "heldout_bpb": 1.0}], n_boot=2)


# ----------------------------------------------------------------------------- L(N, D)


def chinchilla_grid(noise, rng):
    n, d = np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6))
    n, d = n.ravel(), d.ravel()
    return n, d, CHINCHILLA_LAW(n, d) * np.exp(noise * rng.standard_normal(n.shape))


def CHINCHILLA_LAW(n, d):
    c = CHINCHILLA
    return c.E + c.A / n**c.alpha + c.B / d**c.beta


def test_chinchilla_fit_recovers_law():
    n, d, loss = chinchilla_grid(0.002, np.random.default_rng(7))
    fit = compute_optimal.fit_chinchilla(n, d, loss, top_k=16)
    assert pytest.approx(1.69, abs=0.03) == fit.E
    assert fit.alpha == pytest.approx(0.34, abs=0.02)
    assert fit.beta == pytest.approx(0.28, abs=0.02)
    np.testing.assert_allclose(fit.predict(n, d), CHINCHILLA_LAW(n, d), rtol=0.003)
    with pytest.raises(ValueError, match="4 runs; the five-parameter L"):
        compute_optimal.fit_chinchilla(n[:4], d[:4], loss[:4])


def test_huber_gradient_matches_finite_differences():
    n, d, loss = chinchilla_grid(0.01, np.random.default_rng(8))
    args = (np.log(n), np.log(d), np.log(loss), 1e-3)
    theta = np.array([6.0, 6.1, 0.5, 0.35, 0.3])
    _, grad = compute_optimal._huber_objective(theta, *args)
    step = 1e-7
    numeric = [
        (
            compute_optimal._huber_objective(theta + step * e, *args)[0]
            - compute_optimal._huber_objective(theta - step * e, *args)[0]
        )
        / (2 * step)
        for e in np.eye(5)
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


def test_optimal_allocation_minimises_the_law_at_fixed_compute():
    fit = compute_optimal.ChinchillaFit(1.69, 406.4, 410.7, 0.34, 0.28, 0.0, np.zeros(0))
    for c in (1e20, 5.76e23):
        n_opt, d_opt = fit.optimal_allocation(c)
        grid = np.geomspace(n_opt / 10, n_opt * 10, 20001)  # brute force along C = 6 N D
        best = grid[np.argmin(fit.predict(grid, c / (6 * grid)))]
        assert n_opt == pytest.approx(best, rel=1e-3)
        assert 6 * n_opt * d_opt == pytest.approx(c)
    assert fit.a == pytest.approx(0.28 / 0.62)


def test_chinchilla_bootstrap_of_noiseless_runs_is_the_law():
    # Documents that all agree with the law: every replicate refits the same law.
    rng = np.random.default_rng(9)
    n, d = np.meshgrid(np.logspace(7, 9, 3), np.logspace(9, 11, 3))
    nbytes = rng.integers(100, 1000, size=20).astype(float)
    records = [
        {
            "name": f"r{i}",
            "params": ni,
            "tokens": di,
            "doc_nll": CHINCHILLA_LAW(ni, di) * nbytes / 4,
            "doc_bytes": nbytes,
            "doc_tokens": nbytes / 4,
        }
        for i, (ni, di) in enumerate(zip(n.ravel(), d.ravel(), strict=True))
    ]
    result = compute_optimal.bootstrap_chinchilla(records, n_boot=4)
    assert result.resampled == ("runs", "documents")
    for name in ("E", "alpha", "beta"):
        iv = result.intervals[name]
        assert iv.low == pytest.approx(getattr(CHINCHILLA, name), rel=2e-3), name
        assert iv.high == pytest.approx(getattr(CHINCHILLA, name), rel=2e-3), name


# ----------------------------------------------------------------------------- IsoFLOP


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


def test_isoflop_minimum_of_a_parabola_is_its_vertex():
    sizes = np.geomspace(1e6, 1e9, 6)
    n_star = 3.7e7
    losses = 2.0 + 0.3 * (np.log10(sizes) - np.log10(n_star)) ** 2
    records = isoflop_records("c1e17", sizes, losses, 1e17)
    # Two seeds of one size, symmetric about the parabola: averaged before the fit.
    records += [dict(records[2], heldout_bpb=records[2]["heldout_bpb"] + 0.05, seed=1)]
    records[2] = dict(records[2], heldout_bpb=records[2]["heldout_bpb"] - 0.05)
    (m,) = compute_optimal.isoflop_minima(records)
    assert m.u_shaped and m.flops == 1e17
    assert m.n_opt == pytest.approx(n_star, rel=1e-9)
    assert m.loss_opt == pytest.approx(2.0, abs=1e-12)
    assert m.tokens_opt == pytest.approx(1e17 / (6 * n_star), rel=1e-9)


def test_isoflop_minima_of_the_chinchilla_law_and_allocation_exponent():
    fit = compute_optimal.ChinchillaFit(1.69, 406.4, 410.7, 0.34, 0.28, 0.0, np.zeros(0))
    records = []
    for c in (1e18, 1e19, 1e20, 1e21):
        n_opt, _ = fit.optimal_allocation(c)
        sizes = np.geomspace(n_opt / 3, n_opt * 3, 7)
        records += isoflop_records(f"c{c:.0e}", sizes, fit.predict(sizes, c / (6 * sizes)), c)
    records += isoflop_records("tokens", [1e6, 1e7], [3.0, 2.5], 1e15)  # not a budget
    minima = compute_optimal.isoflop_minima(records)
    assert [m.flops for m in minima] == [1e18, 1e19, 1e20, 1e21]
    for m in minima:
        assert m.u_shaped
        assert m.n_opt == pytest.approx(fit.optimal_allocation(m.flops)[0], rel=0.03)
    allocation = compute_optimal.fit_allocation(minima)
    assert allocation.a == pytest.approx(fit.a, abs=0.01)
    assert allocation.b == pytest.approx(fit.b, abs=0.01)


def test_isoflop_without_a_u_shape():
    sizes = np.geomspace(1e6, 1e8, 4)
    falling = isoflop_records("c1e16", sizes, [3.0, 2.6, 2.4, 2.3], 1e16)
    two = isoflop_records("c1e15", sizes[:2], [3.0, 3.1], 1e15)
    short, monotone = compute_optimal.isoflop_minima(falling + two)
    assert not monotone.u_shaped and monotone.n_opt == sizes[-1] and monotone.loss_opt == 2.3
    assert not short.u_shaped and short.coefficients is None and short.n_opt == sizes[0]
    with pytest.raises(ValueError, match="0 U-shaped IsoFLOP budgets"):
        compute_optimal.fit_allocation([short, monotone])


def test_compute_frontier_is_the_lower_envelope():
    rng = np.random.default_rng(10)
    records = [
        {"name": str(i), "flops": float(f), "heldout_bpb": float(b)}
        for i, (f, b) in enumerate(zip(rng.uniform(1, 100, 60), rng.uniform(1, 3, 60), strict=True))
    ]
    frontier = {r["name"] for r in compute_optimal.compute_frontier(records)}
    naive = {
        r["name"]
        for r in records
        if all(
            o["heldout_bpb"] > r["heldout_bpb"]
            for o in records
            if o["flops"] <= r["flops"] and o is not r
        )
    }
    assert frontier == naive


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


def test_plots_write_readable_pngs(tmp_path):
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
    written = [
        plots.plot_loss_vs_params(tokens, str(tmp_path / "params.png"), fit=boot),
        plots.plot_loss_vs_flops(records, str(tmp_path / "flops.png")),
        plots.plot_isoflop(minima, str(tmp_path / "isoflop.png")),
        plots.plot_source_bpb(tokens, str(tmp_path / "sources.png")),
        plots.plot_loss_curves(curves, str(tmp_path / "sub" / "curves.png"), x="step"),
    ]
    for path in written:
        check_png(tmp_path / path)
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
    assert f"| {allocation.a:.3f} |" in text
    assert "non-embedding parameters" in text and "total parameters (embedding included)" in text

"""Power laws in N and run records' metrics (gopher/scaling.py), against synthetic sweeps
drawn from known laws."""

import math

import numpy as np
import pytest
from sweep_records import sweep  # tests/ is on sys.path

from gopher import scaling, scaling_tables

CHINCHILLA = scaling_tables.HOFFMANN_2022


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


def test_runs_interval_covers_alpha_under_run_noise_the_document_bootstrap_misses():
    """One seed per size, and each run's loss off the law by its own factor (training a model
    once, ~1% as the precision ablation's seeds spread): the document bootstrap's interval
    is too narrow for that noise, the t-interval over runs covers the true alpha ~95%."""
    rng = np.random.default_rng(21)
    sizes = np.logspace(3.5, 6.3, 6)
    runs_hits = docs_hits = 0
    for _ in range(60):
        records = sweep(rng, sizes, alpha=0.037, docs=160, doc_sigma=0.05, shared_sigma=0.3)
        for r in records:
            r["doc_nll"] = r["doc_nll"] * math.exp(0.012 * rng.standard_normal())
        result = scaling.bootstrap_power_law(records, n_boot=100, seed=int(rng.integers(1e9)))
        runs, docs = result.alpha_runs, result.alpha
        assert runs.point == pytest.approx(docs.point)
        runs_hits += runs.low <= 0.037 <= runs.high
        docs_hits += docs.low <= 0.037 <= docs.high
    # 95% over runs: 57 of 60 expected, fewer than 51 has probability under 1%; the
    # document bootstrap sees a fraction of the noise and covers far less often.
    assert runs_hits >= 51
    assert docs_hits <= 45


def test_slope_interval_against_a_closed_form_case():
    """Points (0, 0), (1, -1 + d), (2, -2): slope -1, residuals (-d, 2d, -d)/3 ... checked
    by the t-statistic's definition: alpha +- t(0.975, 1) * sqrt(SSR / 1 / Sxx)."""
    from scipy import stats

    d = 0.3
    iv = scaling.slope_interval([0.0, 1.0, 2.0], [0.0, -1.0 + d, -2.0])
    resid = np.array([-d / 3, 2 * d / 3, -d / 3])
    half = stats.t.ppf(0.975, 1) * math.sqrt(resid @ resid / 2.0)
    assert iv.point == pytest.approx(1.0) and iv.low == pytest.approx(1.0 - half)
    assert iv.high == pytest.approx(1.0 + half)
    assert scaling.slope_interval([1.0, 2.0], [1.0, 2.0]) is None  # 2 points: no residuals


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

"""Chinchilla's L(N, D), IsoFLOP minima, the allocation and the frontier
(gopher/compute_optimal.py), against synthetic runs drawn from known laws."""

import dataclasses

import numpy as np
import pytest
from sweep_records import isoflop_records  # tests/ is on sys.path

from gopher import compute_optimal, scaling_tables

CHINCHILLA = scaling_tables.HOFFMANN_2022


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


def test_chinchilla_bootstrap_of_noisy_runs_covers_the_law():
    """Documents off the law by a difficulty shared across runs (5%) and each run's own
    noise (2%): the replicates differ (the resampling is live) and their 95% ranges hold
    the law's E, alpha, beta and allocation exponent a = beta / (alpha + beta)."""
    rng = np.random.default_rng(9)
    n, d = np.meshgrid(np.logspace(7, 9, 4), np.logspace(9, 11, 4))
    nbytes = rng.integers(100, 1000, size=40).astype(float)
    shared = 0.05 * rng.standard_normal(40)
    records = [
        {
            "name": f"r{i}",
            "params": ni,
            "tokens": di,
            "doc_nll": CHINCHILLA_LAW(ni, di)
            * np.exp(shared + 0.02 * rng.standard_normal(40))
            * nbytes
            / 4,
            "doc_bytes": nbytes,
            "doc_tokens": nbytes / 4,
        }
        for i, (ni, di) in enumerate(zip(n.ravel(), d.ravel(), strict=True))
    ]
    result = compute_optimal.bootstrap_chinchilla(records, n_boot=40)
    assert result.resampled == ("runs", "documents")
    truth = {"E": CHINCHILLA.E, "alpha": CHINCHILLA.alpha, "beta": CHINCHILLA.beta}
    truth["a"] = CHINCHILLA.beta / (CHINCHILLA.alpha + CHINCHILLA.beta)
    for name, value in truth.items():
        iv = result.intervals[name]
        assert iv.high - iv.low > 0.01 * value, name  # replicates differ
        assert iv.low <= value <= iv.high, (name, iv.low, value, iv.high)


# ----------------------------------------------------------------------------- IsoFLOP


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
    # Minima on one line: leaving any budget out gives the same exponent.
    assert len(allocation.a_leave_one_out) == 4
    assert allocation.a_leave_one_out == pytest.approx([fit.a] * 4, abs=0.015)
    # One budget's minimum moved: the refits without it and with it differ by its pull.
    moved = [minima[0], dataclasses.replace(minima[1], n_opt=minima[1].n_opt * 2), *minima[2:]]
    pulled = compute_optimal.fit_allocation(moved)
    assert pulled.a_leave_one_out[1] == pytest.approx(allocation.a, abs=0.015)
    assert min(pulled.a_leave_one_out) < pulled.a < max(pulled.a_leave_one_out)


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

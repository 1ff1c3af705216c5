"""Compute-optimal scaling from a sweep's run records (gopher/scaling.py lists their keys):
Chinchilla's L(N, D) = E + A/N^alpha + B/D^beta fitted as Hoffmann et al. 2022 did (approach
3) with bootstrap intervals, each compute budget's IsoFLOP minimum and the allocation
exponents those minima give (approach 2), and the compute frontier.

Shapes: R runs, K held-out documents, B bootstrap replicates, S sizes in one compute budget,
I initialisations of the L-BFGS fit.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize

from gopher.scaling import (
    TOKEN_MATCHED,
    Interval,
    as_array,
    check_metric,
    configured_flops,
    doc_matrices,
    one_blas_thread,
    record_metric,
    record_value,
    replicate_metrics,
)

HUBER_DELTA = 1e-3
# L-BFGS-B bounds of (log A, log B, log E, alpha, beta): wide around Hoffmann et al.'s grid.
THETA_BOUNDS = ((-30.0, 60.0), (-30.0, 60.0), (-10.0, 10.0), (0.0, 5.0), (0.0, 5.0))
# Hoffmann et al. 2022 App. D.2: the grid of L-BFGS initialisations for (alpha, beta, e, a, b).
HOFFMANN_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


# ----------------------------------------------------------------------------- L(N, D)


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # sum of Huber(log residual) / delta^2 at the optimum
    residuals: np.ndarray  # [R] log L - log L_fit

    def predict(self, n, d) -> np.ndarray:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def a(self) -> float:
        """N_opt ∝ C^a under C = 6 N D."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b under C = 6 N D."""
        return self.alpha / (self.alpha + self.beta)

    def optimal_allocation(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising the law at C = 6 N D (Hoffmann et al. eq. 4)."""
        c = np.asarray(flops, dtype=np.float64) / 6
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * c**self.a, c**self.b / g


def _huber_objective(theta, log_n, log_d, log_l, delta):
    """Sum of Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L) / delta^2, and its
    gradient. Divided by delta^2 so the objective is O(1) per run: L-BFGS-B's ftol test is
    absolute below 1, and a raw objective near 1e-6 stops it before it has converged."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # [3, R]
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - log_l
    w /= total  # softmax weights: d LSE / d term
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum() / delta**2
    g = np.clip(r, -delta, delta) / delta**2
    grad = np.array(
        [
            (g * w[0]).sum(),
            (g * w[1]).sum(),
            (g * w[2]).sum(),
            -(g * w[0] * log_n).sum(),
            -(g * w[1] * log_d).sum(),
        ]
    )
    return value, grad


def _grid_objectives(grid: np.ndarray, log_n, log_d, log_l, delta) -> np.ndarray:
    """The objective at each init [I, 5] of (a, b, e, alpha, beta), vectorised."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))  # [I, 1] each
    lse = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)  # [I, R]
    r = lse - log_l
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(1)


def hoffmann_grid() -> np.ndarray:
    """Hoffmann et al.'s initialisations as rows of (a, b, e, alpha, beta) [4500, 5]."""
    g = HOFFMANN_GRID
    rows = itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])
    return np.array(list(rows), dtype=np.float64)


def fit_chinchilla(
    n, d, loss, delta: float = HUBER_DELTA, inits: np.ndarray | None = None, top_k: int = 64
) -> ChinchillaFit:
    """Fits L(N, D) as Hoffmann et al. 2022 did: Huber loss (delta 1e-3) on log L with the law
    in LSE form, L-BFGS from a grid of initialisations, the best optimum kept. The objective
    is evaluated at every grid point and L-BFGS is run from the top_k best of them (all when
    top_k is None): all 4,500 cost 70 times as long and, on a synthetic 36-run grid,
    reached the same optimum as the best 64."""
    n, d, loss = as_array("N", n), as_array("D", d), as_array("loss", loss)
    if not len(n) == len(d) == len(loss):
        raise ValueError(f"{len(n)} N, {len(d)} D and {len(loss)} losses; give one of each per run")
    if len(loss) < 5:
        raise ValueError(f"{len(loss)} runs; the five-parameter L(N, D) needs at least 5")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = hoffmann_grid() if inits is None else np.atleast_2d(np.asarray(inits, np.float64))
    if top_k is not None and len(grid) > top_k:
        screen = _grid_objectives(grid, log_n, log_d, log_l, delta)
        grid = grid[np.argsort(screen, kind="stable")[:top_k]]
    best = None
    with one_blas_thread():
        for theta in grid:
            res = optimize.minimize(
                _huber_objective,
                theta,
                args=(log_n, log_d, log_l, delta),
                jac=True,
                method="L-BFGS-B",
                # Bounds keep exp() finite where the data leave a term unidentified (a
                # bootstrap draw of few distinct D can send log B to 1e3 and beyond).
                bounds=THETA_BOUNDS,
                options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8},
            )
            if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise ValueError("no initialisation of L(N, D) gave a finite fit; check the losses")
    a, b, e, alpha, beta = (float(t) for t in best.x)
    fit = ChinchillaFit(math.exp(e), math.exp(a), math.exp(b), alpha, beta, float(best.fun), None)
    return dataclasses.replace(fit, residuals=log_l - np.log(fit.predict(n, d)))


def _theta(fit: ChinchillaFit) -> np.ndarray:
    return np.array([math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta])


@dataclasses.dataclass(frozen=True)
class ChinchillaBootstrap:
    key: str
    metric: str
    fit: ChinchillaFit
    intervals: dict  # "E", "A", "B", "alpha", "beta", "a", "b" -> Interval
    resampled: tuple[str, ...]  # "runs" and, where recorded, "documents"


def bootstrap_chinchilla(
    records: Sequence[dict],
    key: str = "params",
    metric: str = "loss",
    n_boot: int = 200,
    seed: int = 0,
    delta: float = HUBER_DELTA,
) -> ChinchillaBootstrap:
    """Intervals of the L(N, D) fit: each replicate draws the R runs with replacement and the
    K documents with replacement (jointly), then refits from the full-data optimum and the
    four best grid points."""
    check_metric(metric)
    n = np.array([record_value(r, key) for r in records])
    d = np.array([record_value(r, "tokens") for r in records])
    loss = np.array([record_metric(r, metric) for r in records])
    fit = fit_chinchilla(n, d, loss, delta)
    rng = np.random.default_rng(seed)
    grid = hoffmann_grid()
    samples = []
    for metrics in replicate_metrics(records, metric, n_boot, rng):  # [b, R]
        for row in metrics:
            runs = rng.integers(0, len(records), size=len(records))
            if len(set(zip(n[runs], d[runs], strict=True))) < 5:
                runs = np.arange(len(records))  # a degenerate draw cannot fit five parameters
            log_args = (np.log(n[runs]), np.log(d[runs]), np.log(row[runs]), delta)
            screen = _grid_objectives(grid, *log_args)
            starts = np.vstack([_theta(fit), grid[np.argsort(screen, kind="stable")[:4]]])
            rep = fit_chinchilla(n[runs], d[runs], row[runs], delta, inits=starts, top_k=None)
            samples.append([rep.E, rep.A, rep.B, rep.alpha, rep.beta, rep.a, rep.b])
    samples = np.array(samples)
    names = ("E", "A", "B", "alpha", "beta", "a", "b")
    intervals = {k: Interval.of(getattr(fit, k), samples[:, i]) for i, k in enumerate(names)}
    docs = doc_matrices(records, metric) is not None
    return ChinchillaBootstrap(
        key, metric, fit, intervals, ("runs", "documents") if docs else ("runs",)
    )


# ----------------------------------------------------------------------------- IsoFLOP


@dataclasses.dataclass(frozen=True)
class IsoFlopMinimum:
    """The compute-optimal size of one budget from a parabola of loss in log10 N."""

    budget: str
    flops: float  # the runs' budget_flops, else the label's FLOPs, else the runs' mean
    n_opt: float  # the parabola's vertex when u_shaped, else the best measured N
    loss_opt: float  # the parabola at its vertex when u_shaped, else the best measured loss
    tokens_opt: float  # D at n_opt, interpolated in log-log between the runs' (N, D)
    u_shaped: bool  # positive curvature and the vertex strictly inside the measured N
    coefficients: tuple[float, float, float] | None  # loss = c2 x^2 + c1 x + c0, x = log10 N
    sizes: np.ndarray  # [S] distinct N, ascending
    losses: np.ndarray  # [S] their seed-mean metric
    tokens: np.ndarray  # [S] their training tokens


def isoflop_minima(
    records: Sequence[dict], key: str = "params", metric: str = "bpb"
) -> list[IsoFlopMinimum]:
    """One minimum per compute budget (every budget but TOKEN_MATCHED), by ascending FLOPs.
    A budget with fewer than 3 sizes has no parabola: its best run, u_shaped False."""
    check_metric(metric)
    budgets: dict[str, list[dict]] = {}
    for r in records:
        if str(r.get("budget", "")) != TOKEN_MATCHED:
            budgets.setdefault(str(r.get("budget", "")), []).append(r)
    out = []
    for label, runs in budgets.items():
        flops = configured_flops(label, runs) or float(
            np.mean([record_value(r, "flops") for r in runs])
        )
        by_size: dict[float, list[dict]] = {}
        for r in runs:
            by_size.setdefault(record_value(r, key), []).append(r)
        sizes = np.array(sorted(by_size))
        losses = np.array([np.mean([record_metric(r, metric) for r in by_size[s]]) for s in sizes])
        tokens = np.array([np.mean([record_value(r, "tokens") for r in by_size[s]]) for s in sizes])
        x = np.log10(sizes)
        best = int(np.argmin(losses))
        n_opt, loss_opt, coefficients, u_shaped = sizes[best], losses[best], None, False
        if len(sizes) >= 3:
            c2, c1, c0 = (float(c) for c in np.polyfit(x, losses, 2))
            coefficients = (c2, c1, c0)
            if c2 > 0 and x[0] < -c1 / (2 * c2) < x[-1]:
                u_shaped, vertex = True, -c1 / (2 * c2)
                n_opt, loss_opt = 10**vertex, c0 - c1**2 / (4 * c2)
        tokens_opt = 10 ** np.interp(np.log10(n_opt), x, np.log10(tokens))
        out.append(
            IsoFlopMinimum(
                label,
                flops,
                float(n_opt),
                float(loss_opt),
                float(tokens_opt),
                u_shaped,
                coefficients,
                sizes,
                losses,
                tokens,
            )  # fmt: skip
        )
    return sorted(out, key=lambda m: m.flops)


@dataclasses.dataclass(frozen=True)
class AllocationFit:
    """N_opt = kn C^a and D_opt = kd C^b from IsoFLOP minima (Hoffmann et al. approach 2)."""

    a: float
    kn: float
    b: float
    kd: float
    budgets: tuple[str, ...]
    # a refit without each budget in turn (3+ budgets; else empty): how much one budget's
    # minimum moves the exponent.
    a_leave_one_out: tuple[float, ...] = ()


def fit_allocation(minima: Sequence[IsoFlopMinimum]) -> AllocationFit:
    """Log-log least squares of the U-shaped budgets' N_opt and D_opt against their FLOPs."""
    used = [m for m in minima if m.u_shaped]
    if len({m.flops for m in used}) < 2:
        raise ValueError(
            f"{len(used)} U-shaped IsoFLOP budgets ({[m.budget for m in used]}); the allocation "
            "exponent needs 2 or more: add sizes around each budget's optimum"
        )
    log_c = np.log([m.flops for m in used])
    log_n = np.log([m.n_opt for m in used])
    a, log_kn = np.polyfit(log_c, log_n, 1)
    b, log_kd = np.polyfit(log_c, np.log([m.tokens_opt for m in used]), 1)
    left_out = []
    if len(used) >= 3:
        for i in range(len(used)):
            keep = np.arange(len(used)) != i
            if len(np.unique(log_c[keep])) >= 2:
                left_out.append(float(np.polyfit(log_c[keep], log_n[keep], 1)[0]))
    return AllocationFit(
        float(a),
        math.exp(log_kn),
        float(b),
        math.exp(log_kd),
        tuple(m.budget for m in used),
        tuple(left_out),
    )


def compute_frontier(records: Sequence[dict], metric: str = "bpb") -> list[dict]:
    """The runs no run of fewer or equal FLOPs beats: the lower envelope of loss vs FLOPs."""
    ordered = sorted(records, key=lambda r: (record_value(r, "flops"), record_metric(r, metric)))
    frontier, best = [], math.inf
    for r in ordered:
        value = record_metric(r, metric)
        if value < best:
            frontier.append(r)
            best = value
    return frontier

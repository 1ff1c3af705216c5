"""Scaling-law fits of a model-size sweep: power laws in N, Chinchilla's L(N, D), IsoFLOP minima.

Run records are plain dicts, one per training run, as the sweep runner writes them:

  name                 str    run name, e.g. "s3_c1e14"
  budget               str    its group: a compute-budget label ("c1e14" = 1e14 training FLOPs;
                              "c" and a number, or just the number) or TOKEN_MATCHED ("tokens":
                              every size trained on the same number of tokens)
  seed                 int    training seed; runs that differ only in seed are one configuration
  params               float  total parameters, the tied embedding counted once (Chinchilla's N)
  nonembedding_params  float  parameters outside the embedding (Kaplan's N)
  tokens               float  training tokens D
  flops                float  training FLOPs (6 N D plus attention, as the runner counts them)
  heldout_bpb          float  held-out bits per byte over all sources pooled
  heldout_loss         float  held-out nats per target token (optional)
  bpb_by_source        dict   source -> held-out bpb (optional)
  evals                dict   task -> accuracy (optional)
  doc_nll              [K]    per held-out document: NLL summed over its targets, in nats
  doc_bytes            [K]    per document: UTF-8 bytes of its targets
  doc_tokens           [K]    per document: target tokens (optional; "loss" needs it)
  doc_losses           [K, 2] or [K, 3]: (nll, bytes[, tokens]) rows, instead of the three above

The K documents are the same, in the same order, in every run (the runner guarantees it and
equal doc_bytes are checked), so a bootstrap replicate draws one set of document indices for
all runs: a document that is hard for one model is hard for all, and resampling jointly keeps
that shared difficulty out of the slope's interval. Where documents are given, the fitted
metric is recomputed from their sums ("bpb" = sum nll / (ln 2 sum bytes), "loss" = sum nll /
sum tokens), so the point fit and its replicates measure the same thing.

Shapes: R runs, G configurations (runs of one (N, D, budget) over seeds), K documents,
B bootstrap replicates, S sizes in one compute budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import optimize

TOKEN_MATCHED = "tokens"
METRICS = ("bpb", "loss")
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


# ----------------------------------------------------------------------------- inputs


def _one_blas_thread():
    """Limits BLAS to one thread where threadpoolctl is installed. SciPy's L-BFGS-B and
    least_squares call BLAS on 5 x 5 problems; OpenBLAS threads made fit_chinchilla 10x
    slower on an idle 2-core machine and 70x slower on a busy one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _array(name: str, values, positive: bool = True) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values {a[~np.isfinite(a)][:3].tolist()}")
    if positive and np.any(a <= 0):
        raise ValueError(f"{name} has values <= 0 ({a[a <= 0][:3].tolist()}); give positive ones")
    return a


def check_metric(metric: str):
    """A one-line error for a metric other than 'bpb' or 'loss'."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}; use 'bpb' or 'loss'")


def budget_flops(label: str) -> float | None:
    """The FLOPs a compute-budget label names ("c1e14" -> 1e14), or None if it names none."""
    text = str(label).strip().lower()
    try:
        value = float(text[1:] if text.startswith("c") else text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


def record_value(record: dict, key: str) -> float:
    """A positive number from a run record, or a one-line error naming the run and key."""
    if key not in record:
        raise ValueError(
            f"run {record.get('name', '?')!r} has no {key!r}; the runner must record it"
        )
    value = float(record[key])
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"run {record.get('name', '?')!r} has {key}={value}; it must be positive")
    return value


def doc_arrays(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(nll [K], bytes [K], tokens [K] or None) of a record's held-out documents, or None."""
    name = record.get("name", "?")
    if "doc_losses" in record:
        rows = np.asarray(record["doc_losses"], dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] not in (2, 3):
            raise ValueError(
                f"run {name!r} doc_losses has shape {rows.shape}; give (nll, bytes[, tokens]) rows"
            )
        nll, nbytes = rows[:, 0], rows[:, 1]
        tokens = rows[:, 2] if rows.shape[1] == 3 else None
    elif "doc_nll" in record:
        if "doc_bytes" not in record:
            raise ValueError(f"run {name!r} has doc_nll but no doc_bytes; record both")
        nll = np.asarray(record["doc_nll"], dtype=np.float64).reshape(-1)
        nbytes = np.asarray(record["doc_bytes"], dtype=np.float64).reshape(-1)
        tokens = record.get("doc_tokens")
        tokens = None if tokens is None else np.asarray(tokens, dtype=np.float64).reshape(-1)
    else:
        return None
    if len(nll) == 0 or len(nbytes) != len(nll) or (tokens is not None and len(tokens) != len(nll)):
        raise ValueError(f"run {name!r} has {len(nll)} document NLLs and {len(nbytes)} byte counts")
    _array(f"run {name!r} doc_nll", nll, positive=False)
    _array(f"run {name!r} doc_bytes", nbytes, positive=False)
    return nll, nbytes, tokens


def _denominator(record: dict, nbytes: np.ndarray, tokens, metric: str) -> np.ndarray:
    if metric == "bpb":
        return math.log(2) * nbytes
    if tokens is None:
        raise ValueError(
            f"run {record.get('name', '?')!r} has no doc_tokens; use metric='bpb' or record them"
        )
    return tokens


def record_metric(record: dict, metric: str = "bpb") -> float:
    """A run's held-out bpb or nats/token: from its document sums when it has them."""
    check_metric(metric)
    docs = doc_arrays(record)
    if docs is not None:
        nll, nbytes, tokens = docs
        return float(nll.sum() / _denominator(record, nbytes, tokens, metric).sum())
    return record_value(record, "heldout_bpb" if metric == "bpb" else "heldout_loss")


def _doc_matrices(records: Sequence[dict], metric: str):
    """Numerators and denominators [R, K] of every run's documents, or None if none has any."""
    docs = [doc_arrays(r) for r in records]
    if all(d is None for d in docs):
        return None
    missing = [r.get("name", "?") for r, d in zip(records, docs, strict=True) if d is None]
    if missing:
        raise ValueError(f"runs {missing} have no per-document losses; record them for every run")
    first = docs[0][1]
    for record, (_, nbytes, _) in zip(records, docs, strict=True):
        if len(nbytes) != len(first) or not np.array_equal(nbytes, first):
            raise ValueError(
                f"run {record.get('name', '?')!r} has other held-out documents than "
                f"{records[0].get('name', '?')!r}; every run must score the same ones in order"
            )
    num = np.stack([d[0] for d in docs])
    den = np.stack(
        [_denominator(r, d[1], d[2], metric) for r, d in zip(records, docs, strict=True)]
    )
    return num, den


def _replicate_metrics(
    records: Sequence[dict], metric: str, n_boot: int, rng: np.random.Generator, chunk: int = 128
) -> Iterator[np.ndarray]:
    """Per-run metric [b, R] under joint document resampling, in chunks of b <= chunk."""
    matrices = _doc_matrices(records, metric)
    if matrices is None:
        fixed = np.array([record_metric(r, metric) for r in records])
        for start in range(0, n_boot, chunk):
            yield np.broadcast_to(fixed, (min(chunk, n_boot - start), len(records)))
        return
    num, den = matrices  # [R, K]
    k = num.shape[1]
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, k, size=(b, k))
        counts = np.zeros((b, k))
        np.add.at(counts, (np.arange(b)[:, None], idx), 1.0)  # [b, K] draws of each document
        yield (counts @ num.T) / (counts @ den.T)  # [b, R]


def _configurations(records: Sequence[dict], key: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each configuration's N [G] and its runs' indices (seeds), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        ident = (record_value(r, key), float(r.get("tokens", 0.0)), str(r.get("budget", "")))
        groups.setdefault(ident, []).append(i)
    n = np.array([ident[0] for ident in groups])
    return n, [np.array(v) for v in groups.values()]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A bootstrap interval: the fit on all data, and the replicates' median and 95% range."""

    point: float
    median: float
    low: float  # 2.5th percentile
    high: float  # 97.5th percentile
    samples: np.ndarray  # [B]

    @classmethod
    def of(cls, point: float, samples) -> Interval:
        samples = np.asarray(samples, dtype=np.float64)
        low, median, high = np.percentile(samples, [2.5, 50.0, 97.5])
        return cls(float(point), float(median), float(low), float(high), samples)


# ----------------------------------------------------------------------------- L(N) power law


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """L = (Nc / N)^alpha ("kaplan") or L = E + A N^-alpha ("offset"), fit in log L."""

    form: str
    alpha: float
    coefficients: dict  # kaplan: {"Nc"}; offset: {"E", "A"}
    residuals: np.ndarray  # [R] log L - log L_fit

    def predict(self, n) -> np.ndarray:
        n = np.asarray(n, dtype=np.float64)
        if self.form == "kaplan":
            return (self.coefficients["Nc"] / n) ** self.alpha
        return self.coefficients["E"] + self.coefficients["A"] * n**-self.alpha


def _offset_residuals(theta, x, y):
    e, log_a, alpha = theta
    return np.log(e + np.exp(log_a - alpha * x)) - y


def _fit_offset(x: np.ndarray, y: np.ndarray, inits) -> tuple[np.ndarray, float]:
    """Best (E, log A, alpha) of the least-squares fits in log L from each init."""
    e_max = float(np.exp(y.min())) * (1 - 1e-9)
    lower, upper = [0.0, -200.0, 1e-4], [e_max, 200.0, 5.0]
    best, best_cost = None, math.inf
    with _one_blas_thread():
        for theta in inits:
            theta = np.clip(np.asarray(theta, dtype=np.float64), lower, upper)
            try:
                res = optimize.least_squares(
                    _offset_residuals,
                    theta,
                    bounds=(lower, upper),
                    args=(x, y),
                    xtol=1e-12,
                    ftol=1e-12,
                )
            except ValueError:  # an init where the model is not finite
                continue
            if res.cost < best_cost:
                best, best_cost = res.x, float(res.cost)
    if best is None:
        raise ValueError("no initialisation of L = E + A N^-alpha gave a finite fit")
    return best, best_cost


def _offset_inits(x: np.ndarray, y: np.ndarray):
    loss_min, x_mid = float(np.exp(y.min())), float(np.median(x))
    y_mid = float(np.interp(x_mid, np.sort(x), y[np.argsort(x)]))
    for alpha, e_frac in itertools.product((0.05, 0.1, 0.3, 0.6, 1.0), (0.0, 0.5, 0.9)):
        e = e_frac * loss_min
        yield (e, math.log(max(math.exp(y_mid) - e, 1e-12)) + alpha * x_mid, alpha)


def fit_power_law(n, loss, with_offset: bool = False) -> PowerLawFit:
    """Fits L(N) by least squares in log L: Kaplan's (Nc/N)^alpha (linear in log-log), or
    E + A N^-alpha (bounded nonlinear least squares from a grid of starts, best kept)."""
    n, loss = _array("N", n), _array("loss", loss)
    if len(n) != len(loss):
        raise ValueError(f"{len(n)} values of N for {len(loss)} losses; give one N per loss")
    need = 3 if with_offset else 2
    if len(np.unique(n)) < need:
        raise ValueError(f"{len(np.unique(n))} distinct N; a {need}-parameter law needs {need}+")
    x, y = np.log(n), np.log(loss)
    if not with_offset:
        slope, intercept = np.polyfit(x, y, 1)
        alpha = -float(slope)
        nc = math.exp(intercept / alpha) if alpha != 0 else math.inf
        return PowerLawFit("kaplan", alpha, {"Nc": nc}, y - (intercept + slope * x))
    theta, _ = _fit_offset(x, y, _offset_inits(x, y))
    e, log_a, alpha = (float(t) for t in theta)
    return PowerLawFit(
        "offset", alpha, {"E": e, "A": math.exp(log_a)}, -_offset_residuals(theta, x, y)
    )


def _kaplan_alphas(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-slope of log L on log N for each row of y [b, G] (closed-form least squares)."""
    xc = x - x.mean()
    return -((y - y.mean(axis=1, keepdims=True)) @ xc) / (xc @ xc)


@dataclasses.dataclass(frozen=True)
class PowerLawBootstrap:
    key: str  # which N: "nonembedding_params" or "params"
    metric: str  # "bpb" or "loss"
    fit: PowerLawFit  # on all documents and every seed (configurations' seed means)
    alpha: Interval
    resampled: tuple[str, ...]  # "documents" and/or "seeds"
    n: np.ndarray  # [G] configurations' N
    loss: np.ndarray  # [G] their seed-mean metric


def bootstrap_power_law(
    records: Sequence[dict],
    key: str = "nonembedding_params",
    metric: str = "bpb",
    n_boot: int = 1000,
    seed: int = 0,
    with_offset: bool = False,
) -> PowerLawBootstrap:
    """Interval of alpha in L(N): each replicate draws K documents with replacement (the same
    indices for every run) and, within each configuration, its seeds with replacement; the
    configuration's loss is the mean over its drawn seeds, and the law is refit. Pass one
    group's runs (the token-matched ones, or one per size along the compute frontier)."""
    check_metric(metric)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}; give 1 or more replicates")
    n, groups = _configurations(records, key)
    per_run = np.array([record_metric(r, metric) for r in records])
    loss = np.array([per_run[g].mean() for g in groups])
    fit = fit_power_law(n, loss, with_offset)
    rng = np.random.default_rng(seed)
    x = np.log(n)
    if with_offset:
        e, a = fit.coefficients["E"], fit.coefficients["A"]
        start = [(e, math.log(a), fit.alpha), *_offset_inits(x, np.log(loss))]
    alphas = []
    for metrics in _replicate_metrics(records, metric, n_boot, rng):  # [b, R]
        b = metrics.shape[0]
        means = np.empty((b, len(groups)))
        for j, g in enumerate(groups):
            drawn = g[rng.integers(0, len(g), size=(b, len(g)))]  # [b, seeds]
            means[:, j] = np.take_along_axis(metrics, drawn, axis=1).mean(axis=1)
        if not with_offset:
            alphas.append(_kaplan_alphas(x, np.log(means)))
            continue
        for row in np.log(means):
            alphas.append([_fit_offset(x, row, start[:4])[0][2]])
    resampled = ("documents",) if _doc_matrices(records, metric) is not None else ()
    resampled += ("seeds",) if any(len(g) > 1 for g in groups) else ()
    alpha = Interval.of(fit.alpha, np.concatenate(alphas))
    return PowerLawBootstrap(key, metric, fit, alpha, resampled, n, loss)


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
    n, d, loss = _array("N", n), _array("D", d), _array("loss", loss)
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
    with _one_blas_thread():
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
    for metrics in _replicate_metrics(records, metric, n_boot, rng):  # [b, R]
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
    docs = _doc_matrices(records, metric) is not None
    return ChinchillaBootstrap(
        key, metric, fit, intervals, ("runs", "documents") if docs else ("runs",)
    )


# ----------------------------------------------------------------------------- IsoFLOP


@dataclasses.dataclass(frozen=True)
class IsoFlopMinimum:
    """The compute-optimal size of one budget from a parabola of loss in log10 N."""

    budget: str
    flops: float  # the label's FLOPs, else the runs' mean
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
        flops = budget_flops(label) or float(np.mean([record_value(r, "flops") for r in runs]))
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


def fit_allocation(minima: Sequence[IsoFlopMinimum]) -> AllocationFit:
    """Log-log least squares of the U-shaped budgets' N_opt and D_opt against their FLOPs."""
    used = [m for m in minima if m.u_shaped]
    if len({m.flops for m in used}) < 2:
        raise ValueError(
            f"{len(used)} U-shaped IsoFLOP budgets ({[m.budget for m in used]}); the allocation "
            "exponent needs 2 or more: add sizes around each budget's optimum"
        )
    log_c = np.log([m.flops for m in used])
    a, log_kn = np.polyfit(log_c, np.log([m.n_opt for m in used]), 1)
    b, log_kd = np.polyfit(log_c, np.log([m.tokens_opt for m in used]), 1)
    return AllocationFit(
        float(a), math.exp(log_kn), float(b), math.exp(log_kd), tuple(m.budget for m in used)
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

"""Scaling-law fits of a model-size sweep: its run records, their held-out metrics and
bootstrap replicates, and power laws in N (Kaplan et al.). Chinchilla's L(N, D), IsoFLOP
minima and the compute frontier, built on these, are in gopher/compute_optimal.py; the
published laws they are set beside, in gopher/scaling_tables.py.

Run records are plain dicts, one per training run, as the sweep runner writes them:

  name                 str    run name, e.g. "s3_c1e14"
  budget               str    its group: a compute-budget label ("c1e14" = 1e14 training FLOPs;
                              "c" and a number, or just the number) or TOKEN_MATCHED ("tokens":
                              every size trained on the same number of tokens)
  budget_flops         float  the compute budget's FLOPs (optional; the sweep records its
                              configured budget: it, not the label, is the group's compute)
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
B bootstrap replicates.
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


# ----------------------------------------------------------------------------- inputs


def one_blas_thread():
    """Limits BLAS to one thread where threadpoolctl is installed. SciPy's L-BFGS-B and
    least_squares call BLAS on 5 x 5 problems; OpenBLAS threads made fit_chinchilla 10x
    slower on an idle 2-core machine and 70x slower on a busy one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def as_array(name: str, values, positive: bool = True) -> np.ndarray:
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


def configured_flops(label: str, runs: Sequence[dict]) -> float | None:
    """A compute budget's FLOPs: its runs' budget_flops where they record it, else what its
    label names ("c1e14"), else None (callers fall back to the runs' own FLOPs)."""
    given = {float(r["budget_flops"]) for r in runs if r.get("budget_flops") not in (None, "")}
    if len(given) > 1:
        raise ValueError(
            f"budget {label!r} has runs with budget_flops {sorted(given)}; give each run of a "
            "budget the same FLOPs (or name the budgets apart)"
        )
    return given.pop() if given else budget_flops(label)


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
    as_array(f"run {name!r} doc_nll", nll, positive=False)
    as_array(f"run {name!r} doc_bytes", nbytes, positive=False)
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


def doc_matrices(records: Sequence[dict], metric: str):
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


def replicate_metrics(
    records: Sequence[dict], metric: str, n_boot: int, rng: np.random.Generator, chunk: int = 128
) -> Iterator[np.ndarray]:
    """Per-run metric [b, R] under joint document resampling, in chunks of b <= chunk."""
    matrices = doc_matrices(records, metric)
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


def configuration_metrics(records: Sequence[dict], key: str, metric: str):
    """(N [G], each configuration's run indices, its seed-mean metric [G])."""
    n, groups = _configurations(records, key)
    per_run = np.array([record_metric(r, metric) for r in records])
    return n, groups, np.array([per_run[g].mean() for g in groups])


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


def slope_interval(x, y) -> Interval | None:
    """95% t-interval of -slope of y on x by least squares, from the fit's own residuals
    (Student's t with G - 2 degrees of freedom): for L(N) with one run per size, the scatter
    of the runs about the law (seed-to-seed noise and departures from the law) that a
    bootstrap over held-out documents cannot see. None below 3 points. `samples` is empty:
    the interval is closed-form, not resampled."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or len(np.unique(x)) < 2:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    dof = len(x) - 2
    se = math.sqrt(float(resid @ resid) / dof / float(((x - x.mean()) ** 2).sum()))
    half = float(stats.t.ppf(0.975, dof)) * se
    alpha = -float(slope)
    return Interval(alpha, alpha, alpha - half, alpha + half, np.empty(0))


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
    with one_blas_thread():
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
    n, loss = as_array("N", n), as_array("loss", loss)
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
    # Kaplan's form only, 3+ configurations: the t-interval from the fit's residuals over
    # configurations (`slope_interval`), beside the bootstrap's.
    alpha_runs: Interval | None = None


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
    group's runs (the token-matched ones, or one per size along the compute frontier).

    With one seed per size the bootstrap sees only the held-out documents' sampling noise,
    not the noise of training each model once; `alpha_runs` (Kaplan's form) is the interval
    from the scatter of the configurations about the law, which does."""
    check_metric(metric)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}; give 1 or more replicates")
    n, groups, loss = configuration_metrics(records, key, metric)
    fit = fit_power_law(n, loss, with_offset)
    rng = np.random.default_rng(seed)
    x = np.log(n)
    if with_offset:
        e, a = fit.coefficients["E"], fit.coefficients["A"]
        start = [(e, math.log(a), fit.alpha), *_offset_inits(x, np.log(loss))]
    alphas = []
    for metrics in replicate_metrics(records, metric, n_boot, rng):  # [b, R]
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
    resampled = ("documents",) if doc_matrices(records, metric) is not None else ()
    resampled += ("seeds",) if any(len(g) > 1 for g in groups) else ()
    alpha = Interval.of(fit.alpha, np.concatenate(alphas))
    runs = None if with_offset else slope_interval(x, np.log(loss))
    return PowerLawBootstrap(key, metric, fit, alpha, resampled, n, loss, runs)

"""Parametric scaling laws L(N, D) = E + A N^-alpha + B D^-beta, fitted as Chinchilla's approach 3.

Hoffmann et al. (2022) fit the five parameters by minimising a Huber loss (delta 1e-3) between
the log of the predicted loss, written as a log-sum-exp of (a - alpha log N, b - beta log D, e)
with A = exp(a), B = exp(b), E = exp(e), and the log of the observed loss, with L-BFGS started
from a grid of initialisations. Besiroglu et al. (2024) found the published fit inconsistent
with its own data (an optimiser stopped early, intervals too narrow to be true), so here every
fit runs to tight tolerances, reports whether it converged and its residuals, and carries
bootstrap intervals (resample the points, refit; seeded; a resample that cannot identify the
five parameters is drawn again) for every parameter and every prediction.

N is the number of non-embedding parameters (`train_non_embedding_params` in a run's
summary.json), D the training tokens, L the validation loss in nats. A compute budget C is
FLOPs, and the FLOPs of a run are its own training FLOPs per token times its tokens: a
low-rank model's FLOPs per parameter differ from a dense one's, and at small sizes the dense
lm_head dominates both. `Law.optimal(C)` therefore needs FLOPs per token as a function of N for
the group the law describes: `FlopsPerToken` interpolates the runs' own (N, FLOPs per token)
pairs (see there); without them it is 6N (Kaplan et al. 2020).
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError

HUBER_DELTA = 1e-3
PARAMS = ("E", "A", "alpha", "B", "beta")
# Hoffmann et al.'s grid of initialisations (alpha, beta, e, a, b); L-BFGS runs from the best few.
INIT_GRID = {"alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
             "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
             "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)}
STARTS = 8  # grid points L-BFGS starts from (the lowest objectives): more only repeats the same minima
# A bootstrap refit starts from the full fit too, so fewer grid starts find the same basin.
BOOTSTRAP_STARTS = 2
MIN_POINTS = len(PARAMS)
_THETA_INDEX = {"E": 0, "A": 1, "alpha": 2, "B": 3, "beta": 4}  # where each parameter sits in theta


# ---------------------------------------------------------------- FLOPs per token as a function of N

@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token of a group's models as a function of N (non-embedding params).

    Piecewise linear in log-log through the runs' own (N, FLOPs per token) pairs (the geometric
    mean where one N has several), extended past the ends along the end segments. Exact at the
    sizes trained; between them it follows the zoo's shape; past them it is an extrapolation,
    as every prediction outside the grid is. With one size, FLOPs per token is proportional to
    N; with none, the dense rule 6N.
    """

    log_n: tuple[float, ...] = ()
    log_f: tuple[float, ...] = ()

    @classmethod
    def from_runs(cls, n_params: Sequence[float], flops_per_token: Sequence[float]) -> "FlopsPerToken":
        by_n: dict[float, list[float]] = {}
        for n, f in zip(n_params, flops_per_token):
            by_n.setdefault(math.log(float(n)), []).append(math.log(float(f)))
        knots = sorted((n, sum(fs) / len(fs)) for n, fs in by_n.items())
        return cls(tuple(k[0] for k in knots), tuple(k[1] for k in knots))

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        if not self.log_n:
            return 6.0 * np.asarray(n, dtype=float)
        ln = np.log(np.asarray(n, dtype=float))
        if len(self.log_n) == 1:
            return np.exp(ln - self.log_n[0] + self.log_f[0])
        xs, ys = np.array(self.log_n), np.array(self.log_f)
        lo_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        hi_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        out = np.interp(ln, xs, ys)
        out = np.where(ln < xs[0], ys[0] + lo_slope * (ln - xs[0]), out)
        out = np.where(ln > xs[-1], ys[-1] + hi_slope * (ln - xs[-1]), out)
        return np.exp(out)

    def as_dict(self) -> dict:
        if not self.log_n:
            return {"rule": "6N"}
        return {"rule": "log-log piecewise linear through the runs", "n": [math.exp(x) for x in self.log_n],
                "flops_per_token": [math.exp(y) for y in self.log_f]}


# ---------------------------------------------------------------- the objective

def _log_predict(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """log L for theta = (e, a, alpha, b, beta), as a log-sum-exp (overflow-free)."""
    e, a, alpha, b, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    return np.logaddexp.reduce(terms, axis=0)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> tuple[float, np.ndarray]:
    """Sum of Huber(log predicted - log observed) and its gradient in theta."""
    from scipy.special import huber

    e, a, alpha, b, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    lse = np.logaddexp.reduce(terms, axis=0)
    r = lse - log_l
    w = np.exp(terms - lse)  # softmax weights of the three terms
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # Huber's derivative
    grad = np.array([np.sum(dr * w[2]), np.sum(dr * w[0]), np.sum(dr * w[0] * -log_n),
                     np.sum(dr * w[1]), np.sum(dr * w[1] * -log_d)])
    return float(np.sum(huber(HUBER_DELTA, r))), grad


def _grid() -> np.ndarray:
    g = INIT_GRID
    # (e, a, alpha, b, beta) order, as theta.
    return np.array([(e, a, al, b, be) for al, be, e, a, b in itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])])


def _grid_objectives(grid: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> np.ndarray:
    from scipy.special import huber

    terms = np.stack([grid[:, 1:2] - grid[:, 2:3] * log_n, grid[:, 3:4] - grid[:, 4:5] * log_d,
                      np.repeat(grid[:, 0:1], len(log_n), axis=1)])
    r = np.logaddexp.reduce(terms, axis=0) - log_l
    return huber(HUBER_DELTA, r).sum(axis=1)


@dataclass(frozen=True)
class _Fit:
    theta: np.ndarray
    objective: float
    converged: bool


@functools.lru_cache(maxsize=1)
def _cached_grid() -> np.ndarray:
    return _grid()


def _fit_theta(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, *, starts: int = STARTS,
               extra_starts: Sequence[np.ndarray] = ()) -> _Fit:
    """L-BFGS from the `starts` best grid points (and any extra starts); the lowest objective wins."""
    from scipy.optimize import minimize

    grid = _cached_grid()
    scores = _grid_objectives(grid, log_n, log_d, log_l)
    starts = [*grid[np.argsort(scores)[:starts]], *extra_starts]
    best = None
    for x0 in starts:
        res = minimize(_objective, x0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                       options={"maxiter": 10_000, "ftol": 1e-14, "gtol": 1e-10})
        if best is None or res.fun < best.objective:
            best = _Fit(np.asarray(res.x), float(res.fun), bool(res.success))
    return best


# ---------------------------------------------------------------- the law

def _params(theta: np.ndarray) -> dict[str, float]:
    e, a, alpha, b, beta = (float(x) for x in theta)
    return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta}


def _optimal_n(theta: np.ndarray, flops: FlopsPerToken, budget: float) -> float:
    """argmin over N of L(N, C / f(N)): one-dimensional in log N, on [1, C]."""
    from scipy.optimize import minimize_scalar

    def loss(log_n: float) -> float:
        n = math.exp(log_n)
        d = budget / float(flops(n))
        return float(_log_predict(theta, np.array([log_n]), np.array([math.log(max(d, 1e-300))]))[0])

    res = minimize_scalar(loss, bounds=(0.0, math.log(budget)), method="bounded", options={"xatol": 1e-9})
    return math.exp(res.x)


@dataclass(frozen=True)
class Law:
    """A fitted L(N, D) = E + A N^-alpha + B D^-beta with bootstrap intervals.

    `intervals[name]` is the (lo, hi) percentile interval at `level` over `samples` (one row of
    (e, a, alpha, b, beta) per bootstrap refit). `residuals` are log observed minus log
    predicted loss at the points used, in their order.
    """

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    intervals: dict[str, tuple[float, float]]
    level: float
    points: tuple[tuple[float, float, float], ...]  # (N, D, loss)
    residuals: tuple[float, ...]
    converged: bool
    flops: FlopsPerToken = field(default_factory=FlopsPerToken)
    samples: np.ndarray = field(default=None, repr=False, compare=False)

    @property
    def theta(self) -> np.ndarray:
        return np.array([math.log(self.E), math.log(self.A), self.alpha, math.log(self.B), self.beta])

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        """Predicted loss (nats) at N non-embedding parameters and D tokens."""
        return np.exp(_log_predict(self.theta, np.log(np.asarray(n, float)), np.log(np.asarray(d, float))))

    def optimal(self, budget: float) -> tuple[float, float]:
        """Compute-optimal (N, D) for a training budget in FLOPs, with this group's FLOPs per token."""
        if not budget > 0:
            raise ConfigError(f"compute budget {budget!r} is not valid; accepted: a positive number of FLOPs")
        n = _optimal_n(self.theta, self.flops, float(budget))
        return n, float(budget) / float(self.flops(n))

    def loss_at(self, budget: float) -> float:
        """Predicted loss at the compute-optimal (N, D) of `budget` FLOPs."""
        return float(self.predict(*self.optimal(budget)))

    def sample_losses_at(self, budget: float) -> np.ndarray:
        """The same for every bootstrap refit (each at its own optimum): the prediction's spread."""
        out = []
        for theta in self.samples:
            n = _optimal_n(theta, self.flops, float(budget))
            d = float(budget) / float(self.flops(n))
            out.append(float(np.exp(_log_predict(theta, np.array([math.log(n)]), np.array([math.log(d)]))[0])))
        return np.array(out)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k):.4g} [{self.intervals.get(k, (math.nan,) * 2)[0]:.4g}, "
                          f"{self.intervals.get(k, (math.nan,) * 2)[1]:.4g}]" for k in PARAMS)
        return f"Law({shown}, level={self.level}, points={len(self.points)}, converged={self.converged})"

    def as_dict(self) -> dict:
        res = np.array(self.residuals)
        return {**{k: getattr(self, k) for k in PARAMS},
                "intervals": {k: list(v) for k, v in self.intervals.items()}, "level": self.level,
                "bootstrap_samples": 0 if self.samples is None else len(self.samples), "converged": self.converged,
                "residuals": {"mean": float(res.mean()), "rms": float(np.sqrt((res ** 2).mean())),
                              "max_abs": float(np.abs(res).max()), "values": list(self.residuals)},
                "flops_per_token": self.flops.as_dict()}


def _validate(n_params, n_tokens, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, l_ = (np.asarray(x, dtype=float).ravel() for x in (n_params, n_tokens, loss))
    if not len(n) == len(d) == len(l_):
        raise ConfigError(f"n_params, n_tokens and loss differ in length ({len(n)}, {len(d)}, {len(l_)}); "
                          "accepted: one value of each per run")
    for name, x in (("n_params", n), ("n_tokens", d), ("loss", l_)):
        bad = np.flatnonzero(~(np.isfinite(x) & (x > 0)))
        if len(bad):
            raise ConfigError(f"{name}[{bad[0]}]={float(x[bad[0]])!r} is not valid; accepted: positive finite numbers")
    distinct = len(set(zip(n.tolist(), d.tolist())))
    if distinct < MIN_POINTS:
        raise ConfigError(f"{distinct} distinct (N, D) point(s); a fit of {MIN_POINTS} parameters needs at least {MIN_POINTS}")
    why = unidentified(n, d)
    if why:
        raise ConfigError(why)
    return n, d, l_


def unidentified(n: Sequence[float], d: Sequence[float]) -> str | None:
    """Why the law's parameters cannot be identified from these points, or None if they can.

    With a single N, A N^-alpha is one constant that E absorbs: E, A and alpha are not
    identified (any split fits equally well); with a single D, E, B and beta are not.
    """
    ns, ds = sorted(set(float(x) for x in n)), sorted(set(float(x) for x in d))
    for symbol, values, which, add in (("N", ns, "E, A and alpha", "model sizes"),
                                       ("D", ds, "E, B and beta", "token budgets")):
        if len(values) == 1:
            return (f"every point has {symbol}={values[0]:.4g}: {which} cannot be identified from one {symbol}; "
                    f"accepted: points of at least 2 {add}")
    return None


def _resample(rng: np.random.Generator, n: np.ndarray, d: np.ndarray, tries: int = 1000) -> np.ndarray | None:
    """Indices of a bootstrap resample that can identify the law, or None if none turns up.

    A resample with fewer distinct (N, D) points than parameters, or one N or one D only,
    leaves A, alpha (or B, beta) free: its "fit" is wherever L-BFGS stops, not a draw of the
    estimate. Such resamples are drawn again (the bootstrap is conditioned on an identified fit).
    """
    for _ in range(tries):
        idx = rng.integers(0, len(n), len(n))
        if len(set(zip(n[idx], d[idx]))) >= MIN_POINTS and len(set(n[idx])) > 1 and len(set(d[idx])) > 1:
            return idx
    return None


def fit_law(n_params: Sequence[float], n_tokens: Sequence[float], loss: Sequence[float], *,
            flops_per_token: Sequence[float] | None = None, bootstrap: int = 200, seed: int = 0,
            level: float = 0.95) -> Law:
    """Fit L(N, D) = E + A N^-alpha + B D^-beta to one point per run (see the module docstring).

    `flops_per_token` (one per run) gives `Law.optimal` the group's FLOPs per token; without it,
    6N. `bootstrap` refits on points resampled with replacement (numpy's generator seeded with
    `seed`, so the intervals are reproducible); 0 skips them.
    """
    n, d, l_ = _validate(n_params, n_tokens, loss)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(l_)
    best = _fit_theta(log_n, log_d, log_l)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = _resample(rng, n, d)
        if idx is None:
            break
        samples.append(_fit_theta(log_n[idx], log_d[idx], log_l[idx], starts=BOOTSTRAP_STARTS,
                                  extra_starts=[best.theta]).theta)
    samples_arr = np.array(samples).reshape(-1, len(PARAMS))
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name in PARAMS:
        col = samples_arr[:, _THETA_INDEX[name]]
        # Fitted as logs. A refit whose log A or log B passes float range (a resample that barely
        # constrains the term) is an unbounded coefficient: inf, the interval's honest end.
        with np.errstate(over="ignore"):
            values = np.exp(col) if name in ("E", "A", "B") else col
        lo, hi = np.percentile(values, [tail, 100 - tail]) if len(values) else (math.nan, math.nan)
        intervals[name] = (float(lo), float(hi))
    flops = FlopsPerToken.from_runs(n, flops_per_token) if flops_per_token is not None else FlopsPerToken()
    residuals = log_l - _log_predict(best.theta, log_n, log_d)
    return Law(**_params(best.theta), intervals=intervals, level=level,
               points=tuple(zip(n.tolist(), d.tolist(), l_.tolist())), residuals=tuple(residuals.tolist()),
               converged=best.converged, flops=flops, samples=samples_arr)



def difference_at(a: Law, b: Law, budget: float, level: float = 0.95) -> tuple[float, float, float]:
    """(b - a, lo, hi): the predicted loss gap at a budget, each law at its own optimum.

    The interval pairs the i-th bootstrap refit of each law: the two groups' runs are
    independent data, so independent resamples give the difference's spread.
    """
    diff = b.loss_at(budget) - a.loss_at(budget)
    sa, sb = a.sample_losses_at(budget), b.sample_losses_at(budget)
    m = min(len(sa), len(sb))
    if m == 0:
        return diff, math.nan, math.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(sb[:m] - sa[:m], [tail, 100 - tail])
    return diff, float(lo), float(hi)

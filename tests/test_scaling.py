"""dlr.analysis.scaling: the approach-3 fit recovers a known law; intervals, optimum and FLOPs per token."""
import math
import re

import numpy as np
import pytest

from dlr.errors import ConfigError
from dlr.analysis.scaling import FlopsPerToken, difference_at, fit_law

# Hoffmann et al.'s published fit, as the known law.
TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


def _law(n, d, p=TRUE):
    return p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]


def _grid(noise_seed=0, noise=0.01):
    n, d = np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6))  # three decades of N and of D (Chinchilla-like)
    n, d = n.ravel(), d.ravel()
    rng = np.random.default_rng(noise_seed)
    return n, d, _law(n, d) * (1 + noise * rng.standard_normal(n.size))


@pytest.fixture(scope="module")
def fitted():
    n, d, loss = _grid()
    return fit_law(n, d, loss, bootstrap=12, seed=0)


def test_recovers_a_known_law_from_noisy_points(fitted):
    assert fitted.alpha == pytest.approx(TRUE["alpha"], abs=0.05)
    assert fitted.beta == pytest.approx(TRUE["beta"], abs=0.05)
    assert fitted.E == pytest.approx(TRUE["E"], rel=0.06)
    assert fitted.converged
    # 1% multiplicative noise: log residuals of about 0.01, centred (an optimiser stopped early is not).
    res = np.array(fitted.residuals)
    assert 0.003 < np.sqrt((res ** 2).mean()) < 0.03 and abs(np.median(res)) < 0.005


def test_bootstrap_intervals_bracket_the_fit_and_are_seeded(fitted):
    n, d, loss = _grid()
    for name in ("E", "A", "alpha", "B", "beta"):
        lo, hi = fitted.intervals[name]
        assert lo < hi and lo <= getattr(fitted, name) * 1.02 and getattr(fitted, name) * 0.98 <= hi
    lo, hi = fitted.intervals["alpha"]
    assert lo - 0.05 < TRUE["alpha"] < hi + 0.05
    again = fit_law(n, d, loss, bootstrap=12, seed=0)
    assert again.intervals == fitted.intervals
    other = fit_law(n, d, loss, bootstrap=12, seed=1)
    assert other.intervals != fitted.intervals


def test_noise_free_points_give_the_law_back():
    n, d, loss = _grid(noise=0.0)
    law = fit_law(n, d, loss, bootstrap=0)
    for k, v in TRUE.items():
        assert getattr(law, k) == pytest.approx(v, rel=1e-3)
    assert law.predict(1e9, 1e12) == pytest.approx(_law(1e9, 1e12), rel=1e-4)


def test_optimal_spends_the_budget_and_minimises_the_loss(fitted):
    budget = 1e21
    n, d = fitted.optimal(budget)
    assert 6 * n * d == pytest.approx(budget, rel=1e-9)  # no FLOPs per token given: 6N
    best = fitted.predict(n, d)
    for f in (0.5, 0.8, 1.25, 2.0):  # the same budget spent on another split
        assert fitted.predict(n * f, budget / (6 * n * f)) > best
    assert fitted.loss_at(budget) == pytest.approx(float(best))
    # Chinchilla's law puts the optimum near 20 tokens per parameter at this scale.
    assert 5 < d / n < 100


def test_flops_per_token_goes_through_the_runs_and_sets_the_optimum():
    f = FlopsPerToken.from_runs([1e5, 1e6, 1e7, 1e6], [1.2e7, 3e7, 9e7, 3e7])
    assert f(np.array([1e5, 1e6, 1e7])) == pytest.approx([1.2e7, 3e7, 9e7])
    assert 3e7 < float(f(3e6)) < 9e7 and float(f(1e8)) > 9e7  # between and past the sizes trained
    assert float(FlopsPerToken()(1e6)) == 6e6
    n, d, loss = _grid(noise=0.0)
    law = fit_law(n, d, loss, bootstrap=0, flops_per_token=6 * n + 2e7)  # an lm_head-like overhead
    opt_n, opt_d = law.optimal(1e19)
    assert float(law.flops(opt_n)) * opt_d == pytest.approx(1e19, rel=1e-9)
    # A fixed cost per token makes tokens dearer, so the optimum shifts towards parameters.
    assert opt_n > fit_law(n, d, loss, bootstrap=0).optimal(1e19)[0]


def test_difference_between_two_laws_has_an_interval():
    n, d, loss = _grid()
    a = fit_law(n, d, loss, bootstrap=10, seed=0)
    worse = {**TRUE, "E": TRUE["E"] + 0.1}
    b = fit_law(n, d, _law(n, d, worse) * loss / _law(n, d), bootstrap=10, seed=1)
    diff, lo, hi = difference_at(a, b, 1e21)
    assert diff == pytest.approx(0.1, abs=0.05) and lo < diff < hi and lo > 0


@pytest.mark.parametrize("args,needle", [
    (([1e5, 1e6], [1e8, 1e9], [3.0, 2.9]), "2 distinct (N, D) point"),
    (([1e5] * 6, [1e8] * 6, [3.0] * 6), "1 distinct"),
    (([1e5, 1e6, 1e7, 1e8, 1e9], [1e8] * 5, [3.0, 2.9, 2.8, 2.7, math.nan]), "loss[4]=nan is not valid"),
    (([1e5, 1e6, 1e7, 1e8, 1e9], [1e8, 1e9] * 2 + [1e8], [3.0, -2.9, 2.8, 2.7, 2.6]), "loss[1]=-2.9 is not valid"),
    (([1e5] * 5, [1e8, 1e9, 1e10, 1e11, 1e12], [3.0, 2.9, 2.8, 2.7, 2.6]),
     "every point has N=1e+05: E, A and alpha cannot be identified from one N"),
    (([1e5, 1e6, 1e7, 1e8, 1e9], [1e8] * 5, [3.0, 2.9, 2.8, 2.7, 2.6]),
     "every point has D=1e+08: E, B and beta cannot be identified from one D"),
    (([1e5, 1e6], [1e8], [3.0, 2.9]), "differ in length"),
])
def test_bad_points_are_refused_in_one_line(args, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        fit_law(*args)


def test_a_law_prints_as_its_parameters_and_intervals(fitted):
    law = fitted[0] if isinstance(fitted, tuple) else fitted
    text = repr(law)
    assert text.startswith("Law(E=") and "alpha=" in text and "beta=" in text and f"points={len(law.points)}" in text
    assert len(text) < 400 and "residuals" not in text  # not every point and residual

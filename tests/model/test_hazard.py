"""The exposure-aware link shared by the models, against finite differences and closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from uservalue.models.hazard import cloglog_grad_hess, cloglog_nll, p_buy_from_log_hazard


def _nll_rows(eta: np.ndarray, bought: np.ndarray) -> np.ndarray:
    p = 1.0 - np.exp(-np.exp(eta))
    return np.where(bought, -np.log(p), -np.log(1.0 - p))


@pytest.mark.parametrize("bought", [False, True])
def test_gradient_and_hessian_match_finite_differences(bought: bool) -> None:
    eta = np.linspace(-6, 2.5, 40)
    labels = np.full_like(eta, bought, dtype=bool)
    grad, hess = cloglog_grad_hess(eta, labels)
    h = 1e-5
    numeric_grad = (_nll_rows(eta + h, labels) - _nll_rows(eta - h, labels)) / (2 * h)
    # The Hessian against central differences of the finite-difference-checked gradient.
    numeric_hess = (cloglog_grad_hess(eta + h, labels)[0] - cloglog_grad_hess(eta - h, labels)[0]) / (2 * h)
    np.testing.assert_allclose(grad, numeric_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hess, numeric_hess, rtol=1e-5, atol=1e-7)


def test_nll_is_the_mean_bernoulli_likelihood() -> None:
    eta = np.array([-3.0, -1.0, 0.5])
    bought = np.array([False, True, True])
    assert cloglog_nll(eta, bought) == pytest.approx(_nll_rows(eta, bought).mean())


def test_p_buy_is_a_poisson_process_probability() -> None:
    # hazard 0.01 per day: P(at least one purchase in 100 days) = 1 - e^-1
    assert p_buy_from_log_hazard(np.log(np.array([0.01])), 100.0)[0] == pytest.approx(1 - np.exp(-1))
    # longer windows can only raise it; no hazard means no purchase
    assert p_buy_from_log_hazard(np.array([-4.0]), 200.0)[0] > p_buy_from_log_hazard(np.array([-4.0]), 100.0)[0]
    assert p_buy_from_log_hazard(np.array([-np.inf]), 100.0)[0] < 1e-20


def test_optimum_recovers_a_known_hazard() -> None:
    # Users with windows of 92 and 183 days and one true hazard: the NLL minimum sits at it.
    rng = np.random.default_rng(0)
    days = rng.choice([92.0, 183.0], 200_000)
    true_hazard = 0.004
    bought = rng.random(days.size) < 1 - np.exp(-true_hazard * days)
    grid = np.log(np.linspace(0.002, 0.006, 81))
    losses = [cloglog_nll(g + np.log(days), bought) for g in grid]
    assert np.exp(grid[int(np.argmin(losses))]) == pytest.approx(true_hazard, rel=0.03)

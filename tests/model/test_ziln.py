"""The zero-inflated lognormal loss against independent references, and that its optimum recovers
the parameters that generated the data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from uservalue.models.deep import ziln
from uservalue.models.hazard import p_buy_from_log_hazard

H = 273.0


def test_lognormal_nll_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    value = rng.lognormal(3.0, 1.5, 200)
    loc = rng.normal(2.5, 1.0, 200)
    scale = rng.uniform(0.05, 3.0, 200)
    ours = ziln.lognormal_nll(torch.tensor(value), torch.tensor(loc), torch.tensor(scale)).numpy()
    reference = -stats.lognorm.logpdf(value, s=scale, scale=np.exp(loc))
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("z", [-40.0, -12.0, -3.0, -0.5, 0.0, 0.7, 2.0, 3.5])
def test_cloglog_bernoulli_nll_matches_hand_reference(z: float) -> None:
    # P(buy) = 1 - exp(-exp(z)); -log P(no buy) = exp(z) exactly.
    p = -math.expm1(-math.exp(z))
    for bought, expected in ((1.0, -math.log(p)), (0.0, math.exp(z))):
        got = float(ziln.cloglog_bernoulli_nll(torch.tensor([z], dtype=torch.float64), torch.tensor([bought]))[0])
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_cloglog_matches_hazard_module() -> None:
    """Same link as the GLM/GBDT models (uservalue.models.hazard)."""
    eta = np.linspace(-9, -2, 15)
    days = np.array([92.0, 183.0, H])
    for d in days:
        z = torch.tensor(eta + math.log(d), dtype=torch.float64)
        ours = 1 - np.exp(-ziln.cloglog_bernoulli_nll(z, torch.zeros_like(z)).numpy())
        np.testing.assert_allclose(ours, p_buy_from_log_hazard(eta, d), rtol=1e-10)


def test_ziln_nll_row_by_row() -> None:
    out = torch.tensor([[-5.0, 3.0, 0.2], [-6.0, 2.0, -1.0], [-4.0, 4.0, 1.5], [-5.5, 3.5, 0.0]], dtype=torch.float64)
    beta = torch.tensor(0.4, dtype=torch.float64)
    bought = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    value = torch.tensor([25.0, 0.0, 80.0, 0.0], dtype=torch.float64)  # last row: a $0 purchase
    days = np.array([92.0, 183.0, 273.0, 183.0])
    log_exposure = torch.tensor(np.log(days / H))
    loss = ziln.ziln_nll(out, beta, bought=bought, value=value, log_exposure=log_exposure, horizon_days=H)

    for i in range(4):
        eta, mu, sigma_raw = out[i].tolist()
        p = 1 - math.exp(-math.exp(eta) * days[i])
        expected = -math.log(p) if bought[i] else -math.log(1 - p)
        if value[i] > 0:
            sigma = math.log1p(math.exp(sigma_raw))
            loc = mu + 0.4 * math.log(days[i] / H)
            expected -= stats.lognorm.logpdf(float(value[i]), s=sigma, scale=math.exp(loc))
        assert float(loss[i]) == pytest.approx(expected, rel=1e-10)


def test_prediction_at_horizon() -> None:
    out = torch.tensor([[-5.0, 3.0, 0.2], [-7.5, 1.0, 2.0]], dtype=torch.float64)
    p_buy, value = ziln.predict(out, H)
    for i in range(2):
        eta, mu, sigma_raw = out[i].tolist()
        sigma = math.log1p(math.exp(sigma_raw))
        p = 1 - math.exp(-math.exp(eta) * H)
        assert float(p_buy[i]) == pytest.approx(p, rel=1e-9)
        assert float(value[i]) == pytest.approx(p * math.exp(mu + sigma**2 / 2), rel=1e-9)


def test_extreme_outputs_keep_finite_loss_and_gradients() -> None:
    out = torch.tensor([[-80.0, 0.0, -30.0], [40.0, 50.0, 30.0], [-8.0, -20.0, 0.0], [-8.0, 3.0, 0.0]],
                       requires_grad=True)
    bought = torch.tensor([1.0, 0.0, 1.0, 0.0])
    value = torch.tensor([1e-3, 0.0, 1e6, 0.0])
    loss = ziln.ziln_nll(out, torch.tensor(0.0), bought=bought, value=value,
                         log_exposure=torch.zeros(4), horizon_days=H)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert torch.isfinite(out.grad).all()
    p_buy, ev = ziln.predict(out.detach(), H)
    assert torch.isfinite(p_buy).all() and torch.isfinite(ev).all()
    assert ((p_buy >= 0) & (p_buy <= 1)).all()


def test_loss_optimum_recovers_generating_parameters() -> None:
    """Windows of 92 and 183 days, a constant hazard and lognormal baskets whose location grows
    with log(d/H): maximising the likelihood recovers hazard, mu, sigma and beta."""
    rng = np.random.default_rng(42)
    n = 60_000
    days = rng.choice([92.0, 183.0], n)
    hazard, mu, sigma, beta = 0.004, 3.2, 0.9, 0.35
    bought = rng.random(n) < 1 - np.exp(-hazard * days)
    value = np.where(bought, rng.lognormal(mu + beta * np.log(days / H), sigma), 0.0)
    value[bought & (rng.random(n) < 0.02)] = 0.0  # a few $0 purchases: bought, no lognormal term

    theta = torch.tensor([math.log(0.01), 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    inputs = {"bought": torch.tensor(bought, dtype=torch.float64), "value": torch.tensor(value),
              "log_exposure": torch.tensor(np.log(days / H)), "horizon_days": H}
    optimizer = torch.optim.LBFGS([theta, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ziln.ziln_nll(theta.expand(n, 3), b, **inputs).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    eta_hat, mu_hat, sigma_raw_hat = theta.detach().tolist()
    assert math.exp(eta_hat) == pytest.approx(hazard, rel=0.03)
    assert mu_hat == pytest.approx(mu, abs=0.03)
    assert math.log1p(math.exp(sigma_raw_hat)) == pytest.approx(sigma, abs=0.02)
    assert float(b.detach()) == pytest.approx(beta, abs=0.08)


def test_initial_bias_is_the_marginal_fit() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    days = rng.choice([92.0, 183.0], n)
    bought = rng.random(n) < 0.3
    value = np.where(bought, rng.lognormal(2.0 + 0.4 * np.log(days / H), 0.5), 0.0)
    eta, mu, sigma_raw, beta = ziln.initial_bias(bought, value, days, H)
    assert 1 - math.exp(-math.exp(eta) * days.mean()) == pytest.approx(bought.mean(), rel=1e-9)
    assert beta == pytest.approx(0.4, abs=0.05)
    assert mu == pytest.approx(2.0, abs=0.05)
    assert math.log1p(math.exp(sigma_raw)) == pytest.approx(0.5, abs=0.02)
    head = ziln.ZilnHead(8, (eta, mu, sigma_raw, beta))
    assert head.linear.bias.tolist() == pytest.approx([eta, mu, sigma_raw], rel=1e-6)
    assert float(head.beta.detach()) == pytest.approx(beta, rel=1e-6)
    # One window length: nothing to learn beta from.
    assert ziln.initial_bias(bought, value, np.full(n, 100.0), 120.0)[3] == 0.0

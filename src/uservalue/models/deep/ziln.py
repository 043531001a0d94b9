"""Zero-inflated lognormal (ZILN) head and loss (Wang, Liu & Miao 2019), with a purchase hazard
and label windows of different length as exposure; see docs/models.md."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)
LN2 = math.log(2.0)
SIGMA_MIN = 1e-4
# exp() of the total log hazard stays finite in float32 (exp(30) ~ 1e13, exp(-50) ~ 2e-22).
Z_MIN, Z_MAX = -50.0, 30.0


def _full(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16 outputs (autocast), float64 kept as it is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log1mexp(m: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-m)) for m > 0, accurate for small and large m (Maechler 2012), with no NaN
    gradients from the branch that torch.where does not select."""
    small = m <= LN2
    m_small = torch.where(small, m, torch.full_like(m, LN2))
    m_large = torch.where(small, torch.full_like(m, 2 * LN2), m)
    return torch.where(small, torch.log(-torch.expm1(-m_small)), torch.log1p(-torch.exp(-m_large)))


def sigma_of(sigma_raw: torch.Tensor) -> torch.Tensor:
    return F.softplus(sigma_raw).clamp_min(SIGMA_MIN)


def inverse_softplus(y: float) -> float:
    return float(y + math.log(-math.expm1(-y)))


def cloglog_bernoulli_nll(z: torch.Tensor, bought: torch.Tensor) -> torch.Tensor:
    """-log P(bought) per row, where P(buy) = 1 - exp(-exp(z)) and z = eta + log d."""
    z = z.clamp(Z_MIN, Z_MAX)
    m = torch.exp(z)
    return torch.where(bought > 0.5, -log1mexp(m), m)


def lognormal_nll(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """-log pdf of LogNormal(loc, scale) at value (> 0); scipy.stats.lognorm(s=scale, scale=e^loc)."""
    log_value = torch.log(value)
    return log_value + torch.log(scale) + 0.5 * LOG_2PI + 0.5 * ((log_value - loc) / scale) ** 2


def ziln_nll(
    out: torch.Tensor,
    beta: torch.Tensor,
    *,
    bought: torch.Tensor,
    value: torch.Tensor,
    log_exposure: torch.Tensor,
    horizon_days: float,
) -> torch.Tensor:
    """Per-row loss. out = [eta, mu, sigma_raw] per row ([N, 3]); log_exposure = log(d / H)."""
    out = _full(out)
    eta, mu, sigma_raw = out.unbind(dim=-1)
    z = eta + math.log(horizon_days) + log_exposure
    classification = cloglog_bernoulli_nll(z, bought)
    positive = value > 0
    safe_value = torch.where(positive, value, torch.ones_like(value))
    regression = lognormal_nll(safe_value, mu + beta * log_exposure, sigma_of(sigma_raw))
    return classification + torch.where(positive, regression, torch.zeros_like(regression))


def log_p_buy(out: torch.Tensor, horizon_days: float) -> torch.Tensor:
    z = (_full(out[..., 0]) + math.log(horizon_days)).clamp(Z_MIN, Z_MAX)
    return log1mexp(torch.exp(z))


def predict(out: torch.Tensor, horizon_days: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_buy, expected_value) over the horizon."""
    log_p = log_p_buy(out, horizon_days)
    log_ev = log_expected_value(out, horizon_days, log_p=log_p)
    return torch.exp(log_p), torch.exp(log_ev)


def log_expected_value(out: torch.Tensor, horizon_days: float, *, log_p: torch.Tensor | None = None) -> torch.Tensor:
    """log(p_buy * exp(mu + sigma^2 / 2)) over the horizon, computed in log space."""
    out = _full(out)
    if log_p is None:
        log_p = log_p_buy(out, horizon_days)
    sigma = sigma_of(out[..., 2])
    # exp(44) ~ 1e19: a cap against an absurd sigma, far above any real basket.
    return (log_p + out[..., 1] + 0.5 * sigma**2).clamp(max=44.0)


def initial_bias(bought: np.ndarray, value: np.ndarray, days: np.ndarray,
                 horizon_days: float | None = None) -> tuple[float, float, float, float]:
    """(eta, mu, sigma_raw, beta) of the marginal fit, the start of training: the constant hazard
    that matches the share of buyers, and the least-squares line log(value) ~ mu + beta log(d/H)
    over the positive values (beta clipped to [0, 1], the range a Poisson process of purchases
    allows). Starting beta there matters: when the window length is confounded with the cutoff
    (as on CDNOW, where the 92-day windows belong to the later cutoff), the network could
    otherwise absorb the window effect into mu through tenure-like features."""
    value = np.asarray(value, dtype=np.float64)
    bought = np.asarray(bought, dtype=bool) | (value > 0)
    days = np.asarray(days, dtype=np.float64)
    horizon = float(horizon_days if horizon_days is not None else (days.max() if days.size else 1.0))
    p = float(np.clip(bought.mean() if bought.size else 0.5, 1e-4, 1 - 1e-4))
    eta = math.log(-math.log1p(-p) / float(days.mean() if days.size else 1.0))
    positive = value > 0
    mu, sigma, beta = 0.0, 1.0, 0.0
    if positive.sum() >= 2:
        logs = np.log(value[positive])
        x = np.log(days[positive] / horizon)
        if x.var() > 1e-12:
            beta = float(np.clip(np.cov(x, logs, bias=True)[0, 1] / x.var(), 0.0, 1.0))
        mu = float(logs.mean() - beta * x.mean())
        sigma = float(max((logs - mu - beta * x).std(), 0.1))
    return eta, mu, inverse_softplus(sigma), beta


class ZilnHead(nn.Module):
    """Linear map to (eta, mu, sigma_raw) plus the window-length coefficient beta."""

    def __init__(self, in_features: int, bias: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)) -> None:
        """bias: initial (eta, mu, sigma_raw[, beta]), e.g. from initial_bias."""
        super().__init__()
        self.linear = nn.Linear(in_features, 3)
        self.beta = nn.Parameter(torch.tensor(float(bias[3]) if len(bias) > 3 else 0.0))
        with torch.no_grad():
            self.linear.weight.mul_(0.1)
            self.linear.bias.copy_(torch.tensor(bias[:3], dtype=torch.float32))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32 outputs even under bf16 autocast: exp(eta) and exp(mu) amplify rounding.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.linear(hidden.float())

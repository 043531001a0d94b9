"""Exposure-aware links shared by the models: P(buy within d days) = 1 - exp(-exp(eta + log d)),
written with log1p/expm1 so tiny and huge hazards stay finite."""

from __future__ import annotations

import numpy as np


def p_buy_from_log_hazard(log_hazard: np.ndarray, days: np.ndarray | float) -> np.ndarray:
    mu = np.exp(np.clip(log_hazard + np.log(days), -50, 50))
    return -np.expm1(-mu)


def cloglog_grad_hess(eta: np.ndarray, bought: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian of the Bernoulli negative log-likelihood w.r.t. eta, where
    p = 1 - exp(-exp(eta)) (eta already includes the exposure offset)."""
    eta = np.clip(eta, -30, 10)
    mu = np.exp(eta)
    expm1 = np.expm1(mu)  # e^mu - 1, > 0
    # y = 0: nll = mu            -> grad mu, hess mu
    # y = 1: nll = -log(1-e^-mu) -> grad -mu/(e^mu-1), hess mu(mu e^mu - e^mu + 1)/(e^mu-1)^2
    grad_pos = -mu / expm1
    hess_pos = mu * (mu * (expm1 + 1.0) - expm1) / (expm1**2)
    grad = np.where(bought, grad_pos, mu)
    hess = np.where(bought, hess_pos, mu)
    return grad, np.maximum(hess, 1e-12)


def cloglog_nll(eta: np.ndarray, bought: np.ndarray) -> float:
    eta = np.clip(eta, -30, 10)
    mu = np.exp(eta)
    log_p = np.log(-np.expm1(-mu))
    return float(np.mean(np.where(bought, -log_p, mu)))

"""Logistic regression for p_buy and ridge on log value (a hurdle model, Duan's smearing), on
log-scaled standardised aggregates (docs/models-baselines.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.linear_model import LogisticRegression, Ridge

from uservalue.features.online import FeatureArrays
from uservalue.models.base import (
    FitContext,
    ModelParams,
    ValueModel,
    aggregate_matrix,
    exposure_days,
)

STATE_FILE = "linear.npz"


class LinearParams(ModelParams):
    ridge_alpha: float = Field(1.0, ge=0, description="L2 penalty of the value regression")
    logistic_c: float = Field(1.0, gt=0, description="inverse L2 penalty of the p_buy classifier")
    max_iter: int = Field(2000, ge=10)


class LinearModel(ValueModel):
    name = "linear"
    Params = LinearParams

    def _design(self, features: pd.DataFrame) -> np.ndarray:
        window = np.log(exposure_days(features, self.horizon_days) / self.horizon_days)
        return self._design_matrix(aggregate_matrix(features, self.feature_columns), window)

    def _design_matrix(self, raw: np.ndarray, window: np.ndarray) -> np.ndarray:
        logged = np.log1p(np.clip(np.nan_to_num(raw), 0.0, None))
        scaled = (logged - self._mean) / self._std
        return np.column_stack([scaled, window])

    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, float]:
        logged = np.log1p(np.clip(np.nan_to_num(aggregate_matrix(train, self.feature_columns)), 0.0, None))
        self._mean = logged.mean(axis=0)
        self._std = np.where(logged.std(axis=0) > 0, logged.std(axis=0), 1.0)
        x = self._design(train)
        value = train["value"].to_numpy(dtype=np.float64)
        spent = value > 0
        target = np.log(value[spent])
        ridge = Ridge(alpha=self.params.ridge_alpha).fit(x[spent], target)
        residuals = target - ridge.predict(x[spent])
        bought = train["bought"].to_numpy(dtype=bool)
        logistic = LogisticRegression(C=self.params.logistic_c, max_iter=self.params.max_iter).fit(x, bought)
        self._ridge = np.append(ridge.coef_, ridge.intercept_)
        self._logistic = np.append(logistic.coef_.ravel(), logistic.intercept_)
        self._smearing = float(np.mean(np.exp(residuals)))
        return {
            "ridge_r2": float(ridge.score(x[spent], target)),
            "smearing": self._smearing,
            "window_coefficient_value": float(ridge.coef_[-1]),
            "window_coefficient_p_buy": float(logistic.coef_.ravel()[-1]),
        }

    def _scores(self, features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scoring = features.drop(columns=["label_days"], errors="ignore")  # score at the full horizon
        x = self._design(scoring)
        log_value = x @ self._ridge[:-1] + self._ridge[-1]
        logit = x @ self._logistic[:-1] + self._logistic[-1]
        return x, log_value, logit

    def _outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p_buy, expected value) of design rows."""
        log_value = x @ self._ridge[:-1] + self._ridge[-1]
        logit = x @ self._logistic[:-1] + self._logistic[-1]
        p_buy = 1.0 / (1.0 + np.exp(-logit))
        return p_buy, p_buy * np.exp(np.clip(log_value, None, 30)) * self._smearing

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        x, _log_value, _logit = self._scores(features)
        return self._frame(features, *self._outputs(x))

    def predict_outputs(self, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray]:
        # Scoring is at the full horizon: the window column is log(1) = 0.
        x = self._design_matrix(features.matrix(self.feature_columns), np.zeros(len(features)))
        p_buy, value = self._outputs(x)
        return np.clip(p_buy, 0.0, 1.0), np.maximum(value, 0.0)

    def _save_state(self, directory: Path) -> None:
        np.savez(directory / STATE_FILE, mean=self._mean, std=self._std, ridge=self._ridge,
                 logistic=self._logistic, smearing=np.array([self._smearing]))

    def _load_state(self, directory: Path) -> None:
        with np.load(directory / STATE_FILE) as state:
            self._mean, self._std = state["mean"], state["std"]
            self._ridge, self._logistic = state["ridge"], state["logistic"]
            self._smearing = float(state["smearing"][0])

"""Gradient boosting (LightGBM) on the aggregates: a cloglog booster for p_buy and a Tweedie one for
value, label windows as offsets (docs/models-baselines.md); behaviour influence: models.influence."""

from __future__ import annotations

import json
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from pydantic import Field

from uservalue.features.online import FeatureArrays
from uservalue.models.base import (
    FitContext,
    ModelParams,
    ValueModel,
    aggregate_matrix,
    exposure_days,
    validation_mask,
)
from uservalue.models.hazard import cloglog_grad_hess, cloglog_nll, p_buy_from_log_hazard

P_BUY_FILE = "p_buy.lgb.txt"
VALUE_FILE = "value.lgb.txt"
STATE_FILE = "gbdt.json"


class GbdtParams(ModelParams):
    learning_rate: float = Field(0.03, gt=0, le=1)
    num_leaves: int = Field(15, ge=2)
    min_child_samples: int = Field(100, ge=1)
    feature_fraction: float = Field(0.8, gt=0, le=1)
    lambda_l2: float = Field(1.0, ge=0)
    max_rounds: int = Field(3000, ge=1)
    early_stopping_rounds: int = Field(100, ge=1)
    tweedie_variance_power: float = Field(1.5, gt=1, lt=2)
    num_threads: int = Field(0, ge=0, description="0 = LightGBM's default (all cores)")


def _cloglog_objective(preds: np.ndarray, data: lgb.Dataset) -> tuple[np.ndarray, np.ndarray]:
    return cloglog_grad_hess(preds, data.get_label() > 0.5)


def _cloglog_metric(preds: np.ndarray, data: lgb.Dataset) -> tuple[str, float, bool]:
    return "cloglog_nll", cloglog_nll(preds, data.get_label() > 0.5), False


class GbdtModel(ValueModel):
    name = "gbdt"
    Params = GbdtParams

    def _booster_params(self, ctx_seed: int) -> dict:
        p = self.params
        return {
            "learning_rate": p.learning_rate,
            "num_leaves": p.num_leaves,
            "min_child_samples": p.min_child_samples,
            "feature_fraction": p.feature_fraction,
            "lambda_l2": p.lambda_l2,
            "num_threads": p.num_threads,
            "seed": ctx_seed,
            "deterministic": True,
            "verbosity": -1,
        }

    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, float]:
        x = aggregate_matrix(train, self.feature_columns)
        days = exposure_days(train, self.horizon_days)
        bought = train["bought"].to_numpy(dtype=bool)
        value = train["value"].to_numpy(dtype=np.float64)
        valid = validation_mask(train["user_id"], ctx.valid_fraction, ctx.seed)
        fit_rows = ~valid if valid.any() else np.ones(len(train), dtype=bool)

        # Start from the population rates so the trees model deviations from them.
        self._base_log_hazard = float(np.log(max(bought[fit_rows].sum(), 1) / days[fit_rows].sum()))
        scaled_value = value * self.horizon_days / days
        self._base_log_value = float(np.log(max(scaled_value[fit_rows].mean(), 1e-9)))
        hazard_offset = np.log(days) + self._base_log_hazard
        value_offset = np.log(days / self.horizon_days) + self._base_log_value

        common = self._booster_params(ctx.seed)
        callbacks = [lgb.early_stopping(self.params.early_stopping_rounds, verbose=False)]

        def datasets(label: np.ndarray, offset: np.ndarray) -> tuple[lgb.Dataset, list[lgb.Dataset]]:
            names = self.feature_columns
            fit_set = lgb.Dataset(x[fit_rows], label[fit_rows], init_score=offset[fit_rows],
                                  feature_name=names, free_raw_data=False)
            if not valid.any():
                return fit_set, [fit_set]
            return fit_set, [lgb.Dataset(x[valid], label[valid], init_score=offset[valid],
                                         feature_name=names, reference=fit_set)]

        fit_set, valid_sets = datasets(bought.astype(np.float64), hazard_offset)
        self._p_buy = lgb.train({**common, "objective": _cloglog_objective, "metric": "None"}, fit_set,
                                num_boost_round=self.params.max_rounds, valid_sets=valid_sets,
                                feval=_cloglog_metric, callbacks=callbacks)
        fit_set, valid_sets = datasets(value, value_offset)
        self._value = lgb.train({**common, "objective": "tweedie", "metric": "tweedie",
                                 "tweedie_variance_power": self.params.tweedie_variance_power},
                                fit_set, num_boost_round=self.params.max_rounds, valid_sets=valid_sets,
                                callbacks=callbacks)
        return {
            "p_buy_rounds": float(self._p_buy.best_iteration or self._p_buy.current_iteration()),
            "value_rounds": float(self._value.best_iteration or self._value.current_iteration()),
            "p_buy_valid_nll": float(self._p_buy.best_score["valid_0"]["cloglog_nll"]) if valid.any() else float("nan"),
            "value_valid_tweedie": float(self._value.best_score["valid_0"]["tweedie"]) if valid.any() else float("nan"),
        }

    def _raw(self, booster: lgb.Booster, x: np.ndarray) -> np.ndarray:
        return booster.predict(x, raw_score=True, num_iteration=booster.best_iteration or None)

    def _outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p_buy, expected value) of aggregate rows."""
        p_buy = p_buy_from_log_hazard(self._raw(self._p_buy, x) + self._base_log_hazard, self.horizon_days)
        return p_buy, np.exp(np.clip(self._raw(self._value, x) + self._base_log_value, None, 30))

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        return self._frame(features, *self._outputs(aggregate_matrix(features, self.feature_columns)))

    def predict_outputs(self, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray]:
        p_buy, value = self._outputs(features.matrix(self.feature_columns))
        return np.clip(p_buy, 0.0, 1.0), np.maximum(value, 0.0)

    def _save_state(self, directory: Path) -> None:
        self._p_buy.save_model(directory / P_BUY_FILE)
        self._value.save_model(directory / VALUE_FILE)
        (directory / STATE_FILE).write_text(json.dumps({
            "base_log_hazard": self._base_log_hazard,
            "base_log_value": self._base_log_value,
        }))

    def _load_state(self, directory: Path) -> None:
        self._p_buy = lgb.Booster(model_file=directory / P_BUY_FILE)
        self._value = lgb.Booster(model_file=directory / VALUE_FILE)
        state = json.loads((directory / STATE_FILE).read_text())
        self._base_log_hazard = state["base_log_hazard"]
        self._base_log_value = state["base_log_value"]

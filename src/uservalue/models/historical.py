"""The floor every other model must beat: a user's recent value, scaled to the horizon."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from uservalue.features.online import FeatureArrays
from uservalue.models.base import (
    ArrayPredictions,
    FitContext,
    ModelParams,
    ValueModel,
    aggregate_matrix,
)
from uservalue.models.hazard import p_buy_from_log_hazard


class HistoricalParams(ModelParams):
    window_days: int = Field(365, ge=1, description="one of featurize.windows_days")


class HistoricalModel(ValueModel):
    """expected_value = value in the last `window_days` x horizon / window_days;
    p_buy = 1 - exp(-purchases per day in the window x horizon). Nothing is fitted."""

    name = "historical"
    behavior_aware = False  # purchases only: every prediction owed to the purchase history
    Params = HistoricalParams

    def _columns(self) -> tuple[str, ...]:
        """Spend and purchase count in the window, and on a log with returns the money given back in it
        (labels are net of returns, so the run-rate is too)."""
        window = self.params.window_days
        if window not in self.spec.windows_days:
            from uservalue.errors import ConfigError

            raise ConfigError(
                f"train.historical.window_days: {window} is not one of featurize.windows_days "
                f"{list(self.spec.windows_days)}"
            )
        returned = (f"return_amount_sum_{window}d",) if self.spec.returns else ()
        return f"monetary_sum_{window}d", f"buy_count_{window}d", *returned

    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, float]:
        self._columns()
        return {"fitted_parameters": 0.0}

    def _outputs(self, value: np.ndarray, count: np.ndarray, returned: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(p_buy, expected value) from the window's spend (net of returns, never below 0) and purchase
        count."""
        if returned is not None:
            value = np.maximum(np.nan_to_num(value) - np.nan_to_num(returned), 0.0)
        scale = self.horizon_days / self.params.window_days
        with np.errstate(divide="ignore"):
            log_hazard = np.log(np.nan_to_num(count) / self.params.window_days)
        return p_buy_from_log_hazard(log_hazard, self.horizon_days), np.nan_to_num(value) * scale

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        return self._frame(features, *self._outputs(*aggregate_matrix(features, list(self._columns())).T))

    def predict_arrays(self, features: FeatureArrays) -> ArrayPredictions:
        p_buy, value = self._outputs(*features.matrix(self._columns()).T)
        return self._clipped(p_buy, value, self.purchase_only_influence(len(features)))

    def _save_state(self, directory: Path) -> None:
        """Nothing is learned; the params in model.json are the whole model."""

    def _load_state(self, directory: Path) -> None:
        """See _save_state."""

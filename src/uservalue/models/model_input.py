"""Feature rows as an MLflow model takes them (numeric float64, sequences as lists) and back."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def predict_with_influence(model: Any, features: pd.DataFrame) -> pd.DataFrame:
    """[user_id, p_buy, expected_value, influence_<behaviour>...]: what every consumer reads."""
    return model.predict_with_influence(from_model_input(features))


def to_model_input(features: pd.DataFrame) -> pd.DataFrame:
    """Feature rows as MLflow can describe them: numeric aggregates as float64, sequences as lists."""
    out = pd.DataFrame({"user_id": features["user_id"].astype(str)})
    for column in features.columns:
        if column == "user_id" or column in ("cutoff", "value", "n_purchases", "bought", "label_days"):
            continue
        if column.startswith("seq_"):
            out[column] = [list(map(float, v)) for v in features[column]]
        else:
            out[column] = features[column].astype("float64")
    return out


def from_model_input(features: pd.DataFrame) -> pd.DataFrame:
    """Inverse of to_model_input for the sequence columns (lists back to arrays)."""
    out = features.copy()
    for column in out.columns:
        if column.startswith("seq_") and len(out) and not isinstance(out[column].iloc[0], np.ndarray):
            out[column] = [np.asarray(v) for v in out[column]]
    return out

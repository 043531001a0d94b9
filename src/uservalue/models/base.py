"""One interface for every model: fit on training-cutoff features, predict at any cutoff; label
windows of different lengths are exposures (docs/models-baselines.md)."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from uservalue.errors import ConfigError, InputError
from uservalue.features.online import FeatureArrays
from uservalue.features.sql import FeatureSpec
from uservalue.schema import PURCHASE

PREDICTION_COLUMNS = ("user_id", "p_buy", "expected_value")
MODEL_FILE = "model.json"


@dataclass(frozen=True)
class ModelInfo:
    """What a prediction is attributed to: the registry entry it came from."""

    name: str
    version: str
    run_id: str = ""
    model_type: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class ModelParams(BaseModel):
    """Base of every model's params section (`train.<model>` in params.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def log_metrics_nowhere(metrics: dict[str, float], step: int) -> None:
    """Default sink for per-epoch metrics (training wires MLflow in)."""


@dataclass
class FitContext:
    """What a fit needs besides the data: seeds, device, where to checkpoint, where to log."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    valid_fraction: float = 0.2
    checkpoint_dir: Path | None = None
    log_metrics: Callable[[dict[str, float], int], None] = log_metrics_nowhere
    extra: dict[str, Any] = field(default_factory=dict)


def exposure_days(frame: pd.DataFrame, horizon_days: float) -> np.ndarray:
    """Label window length per training row; rows without one (scoring) get the full horizon."""
    if "label_days" in frame.columns:
        days = frame["label_days"].to_numpy(dtype=np.float64)
        if np.any(days <= 0) or np.any(days > horizon_days + 1e-9):
            raise InputError("features", f"label_days must lie in (0, {horizon_days}]", column="label_days")
        return days
    return np.full(len(frame), float(horizon_days))


def validation_mask(user_ids: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """A stable user-level split: the same user is on one side at every cutoff (no leakage)."""
    if fraction <= 0:
        return np.zeros(len(user_ids), dtype=bool)
    salt = str(seed).encode()
    buckets = np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + str(u).encode(), digest_size=4).digest(), "little") for u in user_ids),
        dtype=np.uint64,
        count=len(user_ids),
    )
    return (buckets % 10_000) < int(fraction * 10_000)


def aggregate_matrix(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """The aggregate columns as float64, with a clear error naming a missing column."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError("features", f"missing feature columns {missing}", expected="the featurize stage's columns")
    return frame[columns].to_numpy(dtype=np.float64, na_value=np.nan)


def behavior_of_column(column: str, behaviors: tuple[str, ...]) -> str | None:
    """Which behaviour an aggregate column describes (`cart_count_7d` -> cart); monetary -> buy."""
    for b in behaviors:
        if column.startswith(f"{b}_"):
            return b
    if column.startswith(("monetary_", "btyd_")) or column == "purchase_days":
        return "buy"
    return None


@dataclass(frozen=True)
class ArrayPredictions:
    """predict_with_influence's numbers as arrays, row for row (the fast path's output)."""

    p_buy: np.ndarray  # float64 [U]
    expected_value: np.ndarray  # float64 [U]
    influence: np.ndarray  # float64 [U, len(behaviors)]: shares per behaviour, rows sum to 1

    def __len__(self) -> int:
        return len(self.p_buy)


class ValueModel(ABC):
    """fit(train) -> self; predict(features) -> [user_id, p_buy, expected_value]."""

    name: ClassVar[str]
    Params: ClassVar[type[ModelParams]] = ModelParams

    def __init__(self, params: ModelParams, spec: FeatureSpec, horizon_days: int) -> None:
        self.params = params
        self.spec = spec
        self.horizon_days = int(horizon_days)

    @classmethod
    def from_config(cls, raw: dict[str, Any] | None, spec: FeatureSpec, horizon_days: int) -> ValueModel:
        try:
            params = cls.Params.model_validate(raw or {})
        except ValidationError as error:
            lines = [
                f"train.{cls.name}.{'.'.join(str(p) for p in item['loc'])}: {item['msg']} (got {item.get('input')!r})"
                for item in error.errors()
            ]
            raise ConfigError("\n".join(lines)) from None
        return cls(params, spec, horizon_days)

    @property
    def feature_columns(self) -> list[str]:
        return self.spec.aggregate_columns()

    @abstractmethod
    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, float]:
        """Fit on training-cutoff rows (features + labels); return a summary of the fit."""

    @abstractmethod
    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        """Columns user_id, p_buy (over the horizon) and expected_value (over the horizon)."""

    def influence(self) -> dict[str, float] | None:
        """Global share of influence per behaviour type (sums to 1), when the model has one."""
        return None

    def attribute(self, features: pd.DataFrame) -> pd.DataFrame:
        """Per user, the share of expected_value attributed to each behaviour (rows sum to 1).

        This default is for models that look only at purchases (historical, BTYD): all of their
        prediction comes from the purchase behaviour."""
        frame = pd.DataFrame({"user_id": features["user_id"].astype(str).to_numpy()})
        for b in self.spec.behaviors:
            frame[b] = 1.0 if b == PURCHASE else 0.0
        return frame

    def predict_with_influence(self, features: pd.DataFrame) -> pd.DataFrame:
        """[user_id, p_buy, expected_value, influence_<behaviour>...] in one call: what the service,
        batch scoring and the monitor read. Models whose attribution reuses the prediction's
        work (the deep models) override it to prepare their inputs once."""
        predictions = self.predict(features)
        shares = self.attribute(features)
        for behavior in self.spec.behaviors:
            predictions[f"influence_{behavior}"] = shares[behavior].to_numpy(dtype="float64")
        return predictions

    def predict_arrays(self, features: FeatureArrays) -> ArrayPredictions:
        """predict_with_influence on feature arrays (the online engine's output, un-keyed user ids):
        the service's path. This generic version builds the DataFrame the batch path would; models
        that can read the arrays directly (the deep, linear, GBDT and historical models) override
        it to skip that, with the same numbers (tests/model/test_fast_path.py)."""
        predictions = self.predict_with_influence(features.to_pandas())
        return ArrayPredictions(
            predictions["p_buy"].to_numpy(dtype=np.float64),
            predictions["expected_value"].to_numpy(dtype=np.float64),
            predictions[[f"influence_{b}" for b in self.spec.behaviors]].to_numpy(dtype=np.float64))

    def _clipped(self, p_buy: np.ndarray, expected_value: np.ndarray,
                 influence: np.ndarray) -> ArrayPredictions:
        """The arrays of _frame's clipping (p_buy in [0, 1], expected_value >= 0)."""
        return ArrayPredictions(np.clip(np.asarray(p_buy, dtype=np.float64), 0.0, 1.0),
                                np.maximum(np.asarray(expected_value, dtype=np.float64), 0.0),
                                np.asarray(influence, dtype=np.float64))

    def purchase_only_influence(self, rows: int) -> np.ndarray:
        """attribute()'s default as an array: every user's prediction owed to the purchase behaviour."""
        return np.tile([1.0 if b == PURCHASE else 0.0 for b in self.spec.behaviors], (rows, 1))

    # -- persistence -------------------------------------------------------------------------
    @abstractmethod
    def _save_state(self, directory: Path) -> None: ...

    @abstractmethod
    def _load_state(self, directory: Path) -> None: ...

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_state(directory)
        (directory / MODEL_FILE).write_text(
            json.dumps(
                {
                    "name": self.name,
                    "params": self.params.model_dump(mode="json"),
                    "spec": asdict(self.spec),
                    "horizon_days": self.horizon_days,
                },
                indent=2,
            )
        )

    @classmethod
    def restore(cls, directory: Path, header: dict[str, Any]) -> ValueModel:
        spec = FeatureSpec.from_dict(header["spec"])
        model = cls(cls.Params.model_validate(header["params"]), spec, header["horizon_days"])
        model._load_state(directory)
        return model

    def _frame(self, features: pd.DataFrame, p_buy: np.ndarray, expected_value: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user_id": features["user_id"].astype(str).to_numpy(),
                "p_buy": np.clip(np.asarray(p_buy, dtype=np.float64), 0.0, 1.0),
                "expected_value": np.maximum(np.asarray(expected_value, dtype=np.float64), 0.0),
            }
        )


def shares_by_behavior(
    user_ids: pd.Series, contributions: np.ndarray, columns: list[str], behaviors: tuple[str, ...]
) -> pd.DataFrame:
    """Per user, each behaviour's share of the absolute feature contributions (rows sum to 1).

    `contributions[i, j]` is how much column j moved user i's prediction (SHAP values, or
    coefficient x standardised value); columns that describe no behaviour are left out."""
    frame = pd.DataFrame({"user_id": user_ids.astype(str).to_numpy()})
    shares = behavior_shares(contributions, columns, behaviors)
    for i, b in enumerate(behaviors):
        frame[b] = shares[:, i]
    return frame


def behavior_shares(contributions: np.ndarray, columns: list[str], behaviors: tuple[str, ...]) -> np.ndarray:
    """shares_by_behavior's numbers as a [rows, len(behaviors)] array (no DataFrame)."""
    magnitude = np.abs(np.asarray(contributions, dtype=np.float64))
    per_behavior = np.zeros((magnitude.shape[0], len(behaviors)))
    for j, column in enumerate(columns):
        b = behavior_of_column(column, behaviors)
        if b is not None:
            per_behavior[:, behaviors.index(b)] += magnitude[:, j]
    total = per_behavior.sum(axis=1, keepdims=True)
    return np.where(total > 0, per_behavior / np.where(total > 0, total, 1.0), 1.0 / len(behaviors))


def global_shares(attribution: pd.DataFrame, behaviors: tuple[str, ...]) -> dict[str, float]:
    """Mean per-user shares: a global influence table that sums to 1."""
    means = attribution[list(behaviors)].mean()
    total = float(means.sum()) or 1.0
    return {b: float(means[b] / total) for b in behaviors}

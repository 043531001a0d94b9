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
from uservalue.models import influence as influence_lib
from uservalue.schema import PURCHASE

PREDICTION_COLUMNS = ("user_id", "p_buy", "expected_value")
MODEL_FILE = "model.json"
PREDICT_CHUNK = 4096  # rows per predict_arrays call of predict_with_influence


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

    # Whether the model reads behaviours other than the purchase: the behaviour-influence tables
    # (uservalue.models.influence) are defined for such models; the others owe every prediction
    # to the purchase history.
    behavior_aware: ClassVar[bool] = True

    def predict_outputs(self, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray]:
        """(p_buy, expected_value) of feature arrays, clipped as predict()'s: the one call behaviour
        influence reads a model through (models.influence). This generic version builds the
        DataFrame; the models override it to read the arrays directly."""
        predictions = self.predict(features.to_pandas())
        return (predictions["p_buy"].to_numpy(dtype=np.float64),
                predictions["expected_value"].to_numpy(dtype=np.float64))

    @property
    def influence_tables(self) -> influence_lib.InfluenceTables | None:
        """The global behaviour-influence tables (effect and share) set after fitting (the train
        stage computes them, models.influence.influence_tables) and saved with the model."""
        return getattr(self, "_influence_tables", None)

    def set_influence(self, tables: influence_lib.InfluenceTables | None) -> None:
        self._influence_tables = tables

    def influence(self) -> dict[str, float] | None:
        """Global share of influence per behaviour type (sums to 1), when the model has one."""
        tables = self.influence_tables
        return None if tables is None or not self.behavior_aware else dict(tables.share)

    def attribute(self, features: pd.DataFrame) -> pd.DataFrame:
        """Per user, the share of expected_value attributed to each behaviour (rows sum to 1): the
        Shapley shares of models.influence, or for a model that looks only at purchases
        (historical, BTYD) all of it owed to the purchase behaviour."""
        frame = pd.DataFrame({"user_id": features["user_id"].astype(str).to_numpy()})
        if not self.behavior_aware:
            shares = self.purchase_only_influence(len(features))
            for i, b in enumerate(self.spec.behaviors):
                frame[b] = shares[:, i]
            return frame
        predictions = self.predict_with_influence(features)
        for b in self.spec.behaviors:
            frame[b] = predictions[f"influence_{b}"].to_numpy(dtype=np.float64)
        return frame

    def predict_with_influence(self, features: pd.DataFrame) -> pd.DataFrame:
        """[user_id, p_buy, expected_value, influence_<behaviour>...] in one call: what the service,
        batch scoring and the monitor read. A behaviour-aware model's numbers are predict_arrays'
        on the frame's rows (in chunks: the Shapley shares score 2^behaviours rows per row)."""
        if not self.behavior_aware:
            predictions = self.predict(features)
            shares = self.attribute(features)
            for behavior in self.spec.behaviors:
                predictions[f"influence_{behavior}"] = shares[behavior].to_numpy(dtype="float64")
            return predictions
        arrays = influence_lib.arrays_from_frame(features, self.spec)
        parts = [self.predict_arrays(arrays.take(np.arange(start, min(start + PREDICT_CHUNK, len(arrays)))))
                 for start in range(0, len(arrays), PREDICT_CHUNK)]
        predictions = pd.DataFrame({"user_id": features["user_id"].astype(str).to_numpy()})
        predictions["p_buy"] = np.concatenate([p.p_buy for p in parts]) if parts else np.zeros(0)
        predictions["expected_value"] = np.concatenate([p.expected_value for p in parts]) if parts else np.zeros(0)
        influence = (np.concatenate([p.influence for p in parts]) if parts
                     else np.zeros((0, len(self.spec.behaviors))))
        for i, behavior in enumerate(self.spec.behaviors):
            predictions[f"influence_{behavior}"] = influence[:, i]
        return predictions

    def predict_arrays(self, features: FeatureArrays) -> ArrayPredictions:
        """predict_with_influence on feature arrays (the online engine's output, un-keyed user ids):
        the service's path. The prediction and every behaviour coalition of the Shapley shares are
        scored in one predict_outputs call (models.influence.predict_with_shares)."""
        if not self.behavior_aware:
            return self._clipped(*self.predict_outputs(features), self.purchase_only_influence(len(features)))
        if len(features) == 0:
            return self._clipped(np.zeros(0), np.zeros(0), np.zeros((0, len(self.spec.behaviors))))
        return self._clipped(*influence_lib.predict_with_shares(self, features))

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
        if self.spec.text_columns:  # the item vectors it was trained with travel with it (MLflow artifact, Bento)
            self._save_item_vectors(directory)
        (directory / MODEL_FILE).write_text(
            json.dumps(
                {
                    "name": self.name,
                    "params": self.params.model_dump(mode="json"),
                    "spec": asdict(self.spec),
                    "horizon_days": self.horizon_days,
                    "influence": None if self.influence_tables is None else self.influence_tables.to_dict(),
                },
                indent=2,
            )
        )

    def _save_item_vectors(self, directory: Path) -> None:
        import shutil

        from uservalue.text.online import ITEM_VECTORS_FILE, item_vectors_for

        source = item_vectors_for(self.spec.text_columns, self.spec.text_vectors).path
        if source.resolve() != (directory / ITEM_VECTORS_FILE).resolve():
            shutil.copyfile(source, directory / ITEM_VECTORS_FILE)

    @classmethod
    def restore(cls, directory: Path, header: dict[str, Any]) -> ValueModel:
        spec = FeatureSpec.from_dict(header["spec"])
        # A model saved by an earlier release may carry params since retired (e.g. the deep models'
        # influence_rows): they no longer change anything, so they are dropped, not an error.
        known = {k: v for k, v in header["params"].items() if k in cls.Params.model_fields}
        model = cls(cls.Params.model_validate(known), spec, header["horizon_days"])
        model._load_state(directory)
        if spec.text_columns:
            from uservalue.text.online import ITEM_VECTORS_FILE, register_item_vectors

            if (directory / ITEM_VECTORS_FILE).is_file():  # saved before 2026-12 without its copy: the project's
                register_item_vectors(directory / ITEM_VECTORS_FILE, spec.text_vectors)
        if header.get("influence") and "effect" in header["influence"]:
            model.set_influence(influence_lib.InfluenceTables.from_dict(header["influence"]))
        return model

    def _frame(self, features: pd.DataFrame, p_buy: np.ndarray, expected_value: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user_id": features["user_id"].astype(str).to_numpy(),
                "p_buy": np.clip(np.asarray(p_buy, dtype=np.float64), 0.0, 1.0),
                "expected_value": np.maximum(np.asarray(expected_value, dtype=np.float64), 0.0),
            }
        )

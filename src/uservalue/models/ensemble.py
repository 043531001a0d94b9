"""The ensemble: the mean of several value models' p_buy and expected value (docs/models.md).

Each member is fitted by the ensemble itself, on the same training rows with the same seed, from
its own params under `train.ensemble.members.<model>`, so the ensemble is one self-contained model
directory (every member saved inside it) that MLflow, the registry and the Bento service load like
any other. Equal weights are fixed before anything is scored: choosing weights or members on the
evaluation window would be tuning on it (issue 16).

Why a mean: on CDNOW the models err in different directions (BTYD under-predicts the 39-week
total by 20 %, gbdt over-predicts it by 9 %), so their mean is better calibrated than any of them,
and averaging rankings that disagree on noise lifts Gini a little.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from uservalue.errors import ConfigError, InputError
from uservalue.features.online import FeatureArrays
from uservalue.features.sql import FeatureSpec
from uservalue.models.base import FitContext, ModelParams, ValueModel

MEMBERS_DIR = "members"
DEFAULT_MEMBERS = ("btyd", "gbdt", "linear", "mlp", "sequence")  # every learned model of the default run


class EnsembleParams(ModelParams):
    members: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {name: {} for name in DEFAULT_MEMBERS},
        description="model -> its params (as train.<model>; {}: the model's defaults)",
    )

    @field_validator("members")
    @classmethod
    def _known_members(cls, members: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from uservalue.config import MODEL_CATALOG

        unknown = [m for m in members if m not in MODEL_CATALOG or m == "ensemble"]
        if unknown:
            raise ValueError(f"unknown or nested members {unknown}; known: "
                             f"{[m for m in MODEL_CATALOG if m != 'ensemble']}")
        if len(members) < 2:
            raise ValueError("name at least two members")
        return members


def _member_context(ctx: FitContext, name: str) -> FitContext:
    """The ensemble's context for one member: its own checkpoint folder and metric names."""

    def log_metrics(values: dict[str, float], step: int) -> None:
        ctx.log_metrics({f"{name}_{key}": value for key, value in values.items()}, step)

    checkpoint = None if ctx.checkpoint_dir is None else Path(ctx.checkpoint_dir) / name
    return dataclasses.replace(ctx, checkpoint_dir=checkpoint, log_metrics=log_metrics)


class EnsembleModel(ValueModel):
    name = "ensemble"
    Params = EnsembleParams

    def __init__(self, params: EnsembleParams, spec: FeatureSpec, horizon_days: int) -> None:
        from uservalue.models.catalog import create_model

        super().__init__(params, spec, horizon_days)
        self.members: dict[str, ValueModel] = {}
        for member, raw in params.members.items():
            try:  # every member's params are checked now, not after the others have trained
                self.members[member] = create_model(member, raw, spec, horizon_days)
            except ConfigError as error:
                raise ConfigError(str(error).replace(f"train.{member}.", f"train.ensemble.members.{member}.")) from None
        # Behaviour-aware when any member is: the Shapley shares then read every member's outputs.
        self.behavior_aware = any(m.behavior_aware for m in self.members.values())

    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, float]:
        summary: dict[str, float] = {}
        for member, model in self.members.items():
            summary.update({f"{member}_{k}": v for k, v in model.fit(train, _member_context(ctx, member)).items()})
        return summary

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        outputs = [model.predict(features) for model in self.members.values()]
        return self._frame(features, np.mean([o["p_buy"].to_numpy() for o in outputs], axis=0),
                           np.mean([o["expected_value"].to_numpy() for o in outputs], axis=0))

    def predict_outputs(self, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray]:
        outputs = [model.predict_outputs(features) for model in self.members.values()]
        return np.mean([o[0] for o in outputs], axis=0), np.mean([o[1] for o in outputs], axis=0)

    def _save_state(self, directory: Path) -> None:
        for member, model in self.members.items():
            model.save(directory / MEMBERS_DIR / member)

    def _load_state(self, directory: Path) -> None:
        from uservalue.models.catalog import load_model

        for member in self.members:
            loaded = load_model(directory / MEMBERS_DIR / member)
            if loaded.name != member:
                raise InputError(str(directory / MEMBERS_DIR / member), "holds another model",
                                 expected=member, found=loaded.name)
            self.members[member] = loaded

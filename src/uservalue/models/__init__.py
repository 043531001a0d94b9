"""Every model behind one interface (uservalue.models.base.ValueModel), looked up by name.

Model modules are imported on first use: torch, LightGBM and PyMC are heavy, and a DAG file or a
CLI `--help` should not pay for them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from uservalue.errors import ConfigError, InputError
from uservalue.features.sql import FeatureSpec
from uservalue.models.base import MODEL_FILE, PREDICTION_COLUMNS, FitContext, ValueModel

MODEL_CLASSES: dict[str, str] = {
    "historical": "uservalue.models.historical:HistoricalModel",
    "btyd": "uservalue.models.btyd:BtydModel",
    "gbdt": "uservalue.models.gbdt:GbdtModel",
    "linear": "uservalue.models.linear:LinearModel",
    "mlp": "uservalue.models.deep.mlp:MlpModel",
    "sequence": "uservalue.models.deep.sequence:SequenceModel",
}


def model_class(name: str) -> type[ValueModel]:
    if name not in MODEL_CLASSES:
        raise ConfigError(f"train.models: unknown model '{name}'; known: {sorted(MODEL_CLASSES)}")
    module, attr = MODEL_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def create_model(name: str, raw_params: dict[str, Any] | None, spec: FeatureSpec, horizon_days: int) -> ValueModel:
    return model_class(name).from_config(raw_params, spec, horizon_days)


def load_model(directory: str | Path) -> ValueModel:
    directory = Path(directory)
    header_path = directory / MODEL_FILE
    if not header_path.is_file():
        raise InputError(str(header_path), "not a saved model", expected=f"{MODEL_FILE} written by ValueModel.save")
    header = json.loads(header_path.read_text())
    return model_class(header["name"]).restore(directory, header)


__all__ = ["MODEL_CLASSES", "PREDICTION_COLUMNS", "FitContext", "ValueModel", "create_model", "load_model", "model_class"]

"""Models by name, from the catalog in uservalue.config (imported on first use: torch, LightGBM and
PyMC are heavy, and a DAG file or `--help` should not pay for them)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from uservalue.config import MODEL_CATALOG
from uservalue.errors import ConfigError, InputError
from uservalue.features.sql import FeatureSpec
from uservalue.models.base import MODEL_FILE, ValueModel


def model_class(name: str) -> type[ValueModel]:
    if name not in MODEL_CATALOG:
        raise ConfigError(f"train.models: unknown model '{name}'; known: {sorted(MODEL_CATALOG)}")
    module, attr = MODEL_CATALOG[name].split(":")
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

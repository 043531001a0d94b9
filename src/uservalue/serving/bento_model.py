"""The service's way to load the packaged ValueModel (and its registry facts) from the BentoML store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# BentoML labels (on the model and the Bento) naming the registry version packaged; the package stage
# writes them, the service reads them.
MODEL_NAME_LABEL, VERSION_LABEL, RUN_LABEL, TYPE_LABEL = "mlflow_model_name", "mlflow_version", "mlflow_run_id", "model_type"


def registry_labels(name: str, version: str, run_id: str) -> dict[str, str]:
    return {MODEL_NAME_LABEL: name, VERSION_LABEL: str(version), RUN_LABEL: run_id}


def value_model_dir(bento_model_path: str | Path) -> Path:
    """Where the saved ValueModel sits inside an imported MLflow model (the pyfunc's artifact)."""
    return Path(bento_model_path) / "mlflow_model" / "artifacts" / "model"


def load_packaged_model(bento_model: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(ValueModel, ModelInfo, metadata record) of a model in the BentoML store.

    The service loads the ValueModel directly rather than through the MLflow pyfunc: the pyfunc's
    schema enforcement of list columns costs milliseconds a request for the same numbers.
    """
    from uservalue.models.base import ModelInfo
    from uservalue.models.catalog import load_model

    labels = dict(bento_model.info.labels)
    metadata = dict(bento_model.info.metadata)
    model = load_model(value_model_dir(bento_model.path))
    info = ModelInfo(name=labels.get(MODEL_NAME_LABEL, str(bento_model.tag.name)),
                     version=labels.get(VERSION_LABEL, str(bento_model.tag.version)),
                     run_id=labels.get(RUN_LABEL, ""), model_type=labels.get(TYPE_LABEL, ""))
    record = {
        "model_name": info.name,
        "model_version": info.version,
        "model_type": info.model_type,
        "run_id": info.run_id,
        "bento_model": str(bento_model.tag),
        "horizon_days": int(model.horizon_days),
        "behaviors": list(model.spec.behaviors),
        **metadata,
    }
    return model, info, record

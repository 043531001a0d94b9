"""The train stage: fit one model on the training cutoffs, save it, and track the run in MLflow.

Outputs (one directory per model, swapped in atomically so a failed run keeps the last good one):
`model/` (the saved ValueModel), `run.json` (MLflow run id and model URI), `influence.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from uservalue.lifecycle import tracking
from uservalue.config import Params
from uservalue.errors import InputError
from uservalue.io import atomic_dir, write_json
from uservalue.models import create_model
from uservalue.models.base import FitContext, spec_from_meta

CHECKPOINT_ROOT = Path(".cache") / "checkpoints"


@dataclass(frozen=True)
class TrainResult:
    name: str
    run_id: str
    model_uri: str
    summary: dict[str, float]
    influence: dict[str, float] | None
    seconds: float


def read_meta(features_dir: Path) -> dict[str, Any]:
    path = features_dir / "meta.json"
    if not path.is_file():
        raise InputError(path, "feature metadata is missing", expected="the featurize stage's meta.json")
    return json.loads(path.read_text())


def read_features(features_dir: Path, split: str) -> pd.DataFrame:
    path = features_dir / f"{split}.parquet"
    if not path.is_file():
        raise InputError(path, f"{split} features are missing", expected="the featurize stage's output")
    return pd.read_parquet(path)


def train_model(
    name: str,
    params: Params,
    features_dir: str | Path,
    out_dir: str | Path,
    project_dir: str | Path = ".",
    log_metrics_hook: Any = None,
) -> TrainResult:
    features_dir, out_dir, project_dir = Path(features_dir), Path(out_dir), Path(project_dir)
    meta = read_meta(features_dir)
    spec = spec_from_meta(meta)
    train = read_features(features_dir, "train")
    if train.empty:
        raise InputError(features_dir / "train.parquet", "no training rows", expected="at least one user per cutoff")
    model = create_model(name, params.train.model_params(name), spec, meta["horizon_days"])

    tracking.configure(params.tracking, project_dir)
    started = time.perf_counter()
    with mlflow.start_run(run_name=f"train-{name}") as run:
        mlflow.set_tags({
            "stage": "train",
            "model": name,
            "git_commit": tracking.git_commit(project_dir),
            **{f"dvc.{path}": md5 for path, md5 in tracking.dvc_output_hashes(project_dir, "featurize").items()},
            **tracking.run_context_tags(),
        })
        mlflow.log_params({
            **tracking.flatten(f"train.{name}", model.params.model_dump(mode="json")),
            "train.seed": params.train.seed,
            "train.device": params.train.device,
            "train.valid_fraction": params.train.valid_fraction,
            "split.horizon_days": meta["horizon_days"],
            "split.train_cutoffs": ",".join(s["cutoff"] for s in meta["splits"]["train"]),
            "train.rows": len(train),
        })

        def log_epoch(metrics: dict[str, float], step: int) -> None:
            mlflow.log_metrics(metrics, step=step)
            if log_metrics_hook is not None:
                log_metrics_hook(metrics, step)

        ctx = FitContext(
            seed=params.train.seed,
            device=params.train.device,
            valid_fraction=params.train.valid_fraction,
            checkpoint_dir=project_dir / CHECKPOINT_ROOT / name,
            log_metrics=log_epoch,
        )
        summary = model.fit(train, ctx)
        numeric = {f"fit_{k}": float(v) for k, v in summary.items() if isinstance(v, int | float)}
        mlflow.log_metrics(numeric)
        mlflow.log_params({f"fit.{k}": v for k, v in summary.items() if not isinstance(v, int | float)})
        influence = model.influence()
        if influence:
            mlflow.log_dict(influence, "influence.json")
            mlflow.log_table(pd.DataFrame({"behavior": list(influence), "influence": list(influence.values())}),
                             "influence_table.json")
        with atomic_dir(out_dir) as tmp:
            model.save(tmp / "model")
            info = tracking.log_value_model(tmp / "model", train, model)
            record = {
                "model": name,
                "run_id": run.info.run_id,
                "experiment_id": run.info.experiment_id,
                "model_uri": info.model_uri,
                "tracking_uri": mlflow.get_tracking_uri(),
            }
            write_json(tmp / "run.json", record)
            write_json(tmp / "influence.json", influence or {})
            write_json(tmp / "summary.json", {k: v for k, v in summary.items()})
    return TrainResult(name, run.info.run_id, info.model_uri, summary, influence, time.perf_counter() - started)

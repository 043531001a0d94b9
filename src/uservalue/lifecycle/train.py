"""The train stage: fit one model on the training cutoffs, save it to `<out>/{model/, run.json,
influence.json, summary.json}` (swapped in atomically) and track the run in MLflow."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from uservalue.errors import InputError
from uservalue.features.store import feature_user_ids, read_features, read_meta
from uservalue.io import atomic_dir, write_json
from uservalue.lifecycle import tracking
from uservalue.lifecycle.context import StageContext
from uservalue.models import influence as influence_lib
from uservalue.models.base import FitContext, ValueModel
from uservalue.models.catalog import create_model
from uservalue.models.influence import InfluenceTables

CHECKPOINT_ROOT = Path(".cache") / "checkpoints"


@dataclass(frozen=True)
class TrainResult:
    name: str
    run_id: str
    model_uri: str
    summary: dict[str, float]
    influence: dict[str, float] | None  # the global share table
    seconds: float
    tables: InfluenceTables | None = None


def train_model(
    ctx: StageContext,
    name: str,
    features_dir: str | Path,
    out_dir: str | Path,
    log_metrics_hook: Callable[[dict[str, float], int], None] | None = None,
) -> TrainResult:
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    params = ctx.params
    meta = read_meta(features_dir)
    max_rows = params.train.max_train_rows(name)
    nproc = params.train.nproc_per_node(name)
    sample = sample_users(feature_user_ids(features_dir, "train"), max_rows, params.train.seed)
    train = read_features(features_dir, "train", users=sample)
    if train.empty:
        raise InputError(features_dir / "train.parquet", "no training rows", expected="at least one user per cutoff")
    model = create_model(name, params.train.model_params(name), meta.spec, meta.horizon_days)

    experiment_id = ctx.tracking()
    tracking.fail_orphan_runs(experiment_id)  # runs of killed earlier stages: FAILED, not RUNNING forever
    started = time.perf_counter()
    with mlflow.start_run(run_name=f"train-{name}") as run:
        mlflow.set_tags({
            "stage": "train",
            "model": name,
            **tracking.process_tags(),
            **tracking.lineage_tags(ctx.root, "featurize"),
        })
        mlflow.log_params({
            **tracking.flatten(f"train.{name}", model.params.model_dump(mode="json")),
            "train.seed": params.train.seed,
            "train.device": params.train.device,
            "train.valid_fraction": params.train.valid_fraction,
            "split.horizon_days": meta.horizon_days,
            "split.train_cutoffs": ",".join(c.isoformat() for c in meta.train_cutoffs),
            "train.rows": len(train),
            f"train.{name}.max_train_rows": max_rows,
            f"train.{name}.distributed.nproc_per_node": nproc,
        })

        def log_epoch(metrics: dict[str, float], step: int) -> None:
            mlflow.log_metrics(metrics, step=step)
            if log_metrics_hook is not None:
                log_metrics_hook(metrics, step)

        fit_ctx = FitContext(
            seed=params.train.seed,
            device=params.train.device,
            valid_fraction=params.train.valid_fraction,
            checkpoint_dir=ctx.root / CHECKPOINT_ROOT / name,
            log_metrics=log_epoch,
            # > 1: the model trains under torchrun; rank 0's epochs come back to log_epoch, here
            extra={"nproc_per_node": nproc} if nproc > 1 else {},
        )
        summary = model.fit(train, fit_ctx)
        numeric = {f"fit_{k}": float(v) for k, v in summary.items() if isinstance(v, int | float)}
        mlflow.log_metrics(numeric)
        mlflow.log_params({f"fit.{k}": v for k, v in summary.items() if not isinstance(v, int | float)})
        influence_started = time.perf_counter()
        tables = behaviour_influence(model, train, params.train.influence_users, params.train.seed)
        influence = model.influence()
        if tables is not None:
            log_influence(tables)
            mlflow.log_metric("influence_seconds", time.perf_counter() - influence_started)
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
            write_json(tmp / "influence.json", {} if tables is None else tables.to_dict())
            write_json(tmp / "summary.json", dict(summary))
    return TrainResult(name, run.info.run_id, info.model_uri, summary, influence, time.perf_counter() - started,
                       tables)


def behaviour_influence(model: ValueModel, train: pd.DataFrame, users: int, seed: int) -> InfluenceTables | None:
    """The effect and share tables (models.influence) of a behaviour-aware model on `users` training
    rows drawn with `seed`, set on the model (saved with it); None for the others or users = 0."""
    if not model.behavior_aware or users <= 0:
        return None
    rows = influence_lib.sample_rows(len(train), users, seed)
    arrays = influence_lib.arrays_from_frame(train.iloc[rows], model.spec)
    tables = influence_lib.influence_tables(model, arrays,
                                            influence_lib.seen_behaviors(train, model.spec.behaviors))
    model.set_influence(tables)
    return tables


def influence_frame(tables: InfluenceTables) -> pd.DataFrame:
    """Both tables as one row per behaviour: share, effect on expected_value and on p_buy (with
    their 95% intervals); effect null for the purchase and for behaviours never seen in training."""
    rows = []
    for b, share in tables.share.items():
        effect, effect_p = tables.effect.get(b), tables.effect_p_buy.get(b)
        rows.append({
            "behavior": b, "share": share,
            "effect": None if effect is None else effect["mean"],
            "effect_low": None if effect is None else effect["low"],
            "effect_high": None if effect is None else effect["high"],
            "effect_p_buy": None if effect_p is None else effect_p["mean"],
        })
    return pd.DataFrame(rows)


def log_influence(tables: InfluenceTables) -> None:
    """MLflow: influence.json (both tables), influence_table.json, and one metric per number."""
    mlflow.log_dict(tables.to_dict(), "influence.json")
    mlflow.log_table(influence_frame(tables), "influence_table.json")
    metrics = {f"influence_share_{b}": v for b, v in tables.share.items()}
    metrics.update({f"influence_effect_{b}": v["mean"] for b, v in tables.effect.items() if v is not None})
    metrics.update({f"influence_effect_p_buy_{b}": v["mean"] for b, v in tables.effect_p_buy.items()
                    if v is not None})
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})


def sample_users(user_ids: np.ndarray, max_rows: int | None, seed: int) -> list[str] | None:
    """Whole users (all their cutoffs), in an order fixed by `seed` alone, while their rows fit in
    `max_rows`; None when every row fits (no sampling). The same seed and users give the same sample
    whatever the order of the file."""
    if max_rows is None or len(user_ids) <= max_rows:
        return None
    rows_per_user = pd.Series(user_ids, dtype=str).value_counts().sort_index()
    order = np.random.default_rng(seed).permutation(len(rows_per_user))
    shuffled = rows_per_user.iloc[order]
    kept = shuffled.index[np.cumsum(shuffled.to_numpy()) <= max_rows]
    return sorted(kept)

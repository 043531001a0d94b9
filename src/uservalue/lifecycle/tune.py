"""`uservalue tune`: hyperparameter search for one model (Optuna), each trial a nested MLflow run, the
best parameters written into `train.<model>` of params.yaml, so the next `dvc repro` trains with them.

Tuning sees only the training cutoffs: each trial fits on the training rows of most users and is
scored on the held-out users' rows at the latest training cutoff. The evaluation window is never read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from uservalue.config import SearchDimension, TuneParams
from uservalue.errors import ConfigError, InputError
from uservalue.features.store import read_features, read_meta
from uservalue.io import atomic_path, write_json
from uservalue.lifecycle import metrics, tracking
from uservalue.lifecycle.context import StageContext
from uservalue.models.base import FitContext, validation_mask
from uservalue.models.catalog import create_model

# A salt apart from train.seed's: the users a trial is scored on are not the users the model holds out
# for its own early stopping (validation_mask with train.seed), so early stopping still has users.
SPLIT_SALT = 7919


@dataclass(frozen=True)
class TuneSplit:
    fit: pd.DataFrame  # training rows of the users kept for fitting (every training cutoff)
    score: pd.DataFrame  # held-out users' rows at the latest training cutoff


@dataclass(frozen=True)
class TuneResult:
    model: str
    metric: str
    best_value: float  # the metric itself (not its higher-is-better score)
    best_params: dict[str, Any]
    trials: int
    parent_run_id: str
    seconds: float


def split_for_tuning(train: pd.DataFrame, valid_fraction: float, seed: int) -> TuneSplit:
    """Held-out users scored at the latest training cutoff; the others fit (all their cutoffs)."""
    if train.empty:
        raise InputError("features train", "no training rows", expected="the featurize stage's train split")
    held_out = validation_mask(train["user_id"], valid_fraction, seed + SPLIT_SALT)
    latest = train["cutoff"] == train["cutoff"].max()
    score_rows = held_out & latest.to_numpy()
    if not score_rows.any() or held_out.all():
        raise ConfigError(f"tune.valid_fraction: {valid_fraction} leaves no users to score or none to fit")
    return TuneSplit(train.loc[~held_out].reset_index(drop=True), train.loc[score_rows].reset_index(drop=True))


def suggest(trial: Any, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """One point of the search space (`tune.space.<model>`)."""
    chosen: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.choices is not None:
            chosen[name] = trial.suggest_categorical(name, list(dim.choices))
        elif dim.type == "int":
            chosen[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
        else:
            chosen[name] = trial.suggest_float(name, float(dim.low), float(dim.high), log=dim.log)
    return chosen


def current_point(name: str, base: dict[str, Any], space: dict[str, SearchDimension],
                  features_dir: Path) -> dict[str, Any]:
    """The model's present values of the searched params (train.<model> over the model's defaults),
    those inside the search space."""
    meta = read_meta(features_dir)
    present = create_model(name, base, meta.spec, meta.horizon_days).params.model_dump()
    point = {}
    for key, dim in space.items():
        value = present.get(key)
        inside = (value in dim.choices) if dim.choices is not None else (
            isinstance(value, int | float) and dim.low <= value <= dim.high)
        if inside:
            point[key] = value
    return point


def score_trial(name: str, model_params: dict[str, Any], split: TuneSplit, ctx: StageContext,
                features_dir: Path, metric: str) -> dict[str, float]:
    """Fit with these params and score the held-out users: the value metrics of the label window they
    have (predictions over the horizon scaled to it by the same exposure rule the models train with)."""
    meta = read_meta(features_dir)
    model = create_model(name, model_params, meta.spec, meta.horizon_days)
    model.fit(split.fit, FitContext(seed=ctx.params.train.seed, device=ctx.params.train.device,
                                    valid_fraction=ctx.params.train.valid_fraction))
    predicted = model.predict(split.score)
    window = split.score["label_days"].to_numpy(dtype=np.float64) / meta.horizon_days
    scores = metrics.value_metrics(split.score["value"].to_numpy(dtype=np.float64),
                                   predicted["expected_value"].to_numpy() * window,
                                   split.score["bought"].to_numpy(dtype=bool), predicted["p_buy"].to_numpy())
    if metric not in scores:
        raise ConfigError(f"tune.metric: '{metric}' is not one of {sorted(scores)}")
    return scores


def tune_model(ctx: StageContext, name: str, features_dir: str | Path, *, trials: int | None = None,
               timeout_s: float | None = None) -> TuneResult:
    import optuna

    params = ctx.params
    cfg: TuneParams = params.tune
    space = cfg.space.get(name)
    if not space:
        raise ConfigError(f"tune.space.{name}: no search space for model '{name}'; spaces: {sorted(cfg.space)}")
    features_dir = Path(features_dir)
    metric = cfg.metric or params.evaluate.primary_metric
    split = split_for_tuning(read_features(features_dir, "train"), cfg.valid_fraction, cfg.seed)
    base = params.train.model_params(name)

    ctx.tracking()
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    with mlflow.start_run(run_name=f"tune-{name}") as parent:
        mlflow.set_tags({"stage": "tune", "model": name, **tracking.process_tags(),
                         **tracking.lineage_tags(ctx.root, "featurize")})
        mlflow.log_params({"tune.metric": metric, "tune.trials": trials or cfg.trials, "tune.seed": cfg.seed,
                           "tune.valid_fraction": cfg.valid_fraction, "tune.fit_rows": len(split.fit),
                           "tune.score_rows": len(split.score)})

        def objective(trial: Any) -> float:
            chosen = suggest(trial, space)
            with mlflow.start_run(run_name=f"tune-{name}-{trial.number}", nested=True):
                mlflow.set_tags({"stage": "tune-trial", "model": name, "trial": str(trial.number)})
                mlflow.log_params({f"train.{name}.{k}": v for k, v in chosen.items()})
                scores = score_trial(name, {**base, **chosen}, split, ctx, features_dir, metric)
                mlflow.log_metrics({k: v for k, v in scores.items() if math.isfinite(v)})
            trial.set_user_attr("value", scores[metric])
            # metrics.score: higher is better for every metric (total_error: closeness to 0).
            return metrics.score(metric, scores[metric])

        # Trial 0 is the current train.<model>: the search never ends worse than what it started from.
        study.enqueue_trial(current_point(name, base, space, features_dir))
        study.optimize(objective, n_trials=trials or cfg.trials, timeout=timeout_s or cfg.timeout_s)
        best = dict(study.best_params)
        best_value = float(study.best_trial.user_attrs.get("value", study.best_value))
        mlflow.log_params({f"best.{k}": v for k, v in best.items()})
        mlflow.log_metric(f"best_{metric}", best_value)
        mlflow.log_dict({"model": name, "metric": metric, "best_params": best}, "best_params.json")
    return TuneResult(name, metric, best_value, best, len(study.trials), parent.info.run_id,
                      time.perf_counter() - started)


def write_best_params(params_path: str | Path, result: TuneResult) -> dict[str, Any]:
    """Merge the best parameters into `train.<model>` of params.yaml, comments and order kept (written
    atomically), so `dvc repro` retrains that model with them. Returns the section as written."""
    from ruamel.yaml import YAML

    params_path = Path(params_path)
    yaml = YAML()
    yaml.preserve_quotes = True
    # ruamel writes None as an empty value; params.yaml spells it `null`
    yaml.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = yaml.load(params_path.read_text())
    train = document.get("train")
    if train is None:
        raise InputError(params_path, "no train section", column="train")
    section = train.get(result.model)
    if section is None or not hasattr(section, "update"):
        train[result.model] = section = {}
    elif getattr(section.fa, "_flow_style", False):  # `gbdt: {}`: written out block style
        section.fa.set_block_style()
    section.update({k: _plain(v) for k, v in result.best_params.items()})
    with atomic_path(params_path) as tmp, tmp.open("w") as handle:
        yaml.dump(document, handle)
    return dict(section)


def _plain(value: Any) -> Any:
    # numpy scalars from a sampler would be written as YAML tags
    return value.item() if hasattr(value, "item") else value


def write_summary(path: str | Path, result: TuneResult) -> None:
    write_json(path, {"model": result.model, "metric": result.metric, "best_value": result.best_value,
                      "best_params": result.best_params, "trials": result.trials,
                      "mlflow_parent_run_id": result.parent_run_id, "seconds": round(result.seconds, 1)})

"""Model-quality experiments on a project's features (issue 16), each one an MLflow run with its metrics.

Fits variants of the value models on the training cutoffs only and scores them on the evaluation
cutoff exactly as the evaluate stage does (`uservalue.lifecycle.evaluate.score_model`). Nothing here
is chosen on the evaluation window: every variant's settings are fixed before it is scored, or picked
on held-out users at the latest training cutoff. Prints what it measured; asserts nothing.

Experiments:
  baseline          gbdt as params.yaml trains it
  stacked           gbdt with BTYD inputs (P(alive), expected purchases, expected spend per purchase):
                    BTYD is fitted on each cutoff's own rows (history before that cutoff only, no
                    labels), so no training row's inputs saw its label window
  elastic           gbdt whose label-window offset is k * log(d / horizon) instead of log(d / horizon),
                    with k measured on the events before the evaluation cutoff (how value accumulates
                    over the earliest training cutoff's window: V(d) ~ d^k)
  stacked_elastic   both
  ensemble          the ensemble model (uservalue.models.ensemble): the mean of the listed models,
                    each fitted with its train.<model> params (fixed equal weights, chosen before scoring)

    python bench/quality_experiments.py --project DIR [--experiments baseline stacked ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from uservalue.config import load_params
from uservalue.features.store import read_features, read_meta
from uservalue.lifecycle import metrics
from uservalue.lifecycle.evaluate import score_model
from uservalue.models.base import FitContext, exposure_days
from uservalue.models.btyd import INPUT_COLUMNS, BtydModel
from uservalue.models.catalog import create_model
from uservalue.models.gbdt import GbdtModel

EXPERIMENTS = ("baseline", "stacked", "elastic", "stacked_elastic", "ensemble")


def with_btyd_inputs(frame: pd.DataFrame, btyd_params: dict, spec, horizon_days: int) -> pd.DataFrame:
    """The frame with BTYD's inputs, BTYD fitted per cutoff on that cutoff's rows."""
    parts = []
    for _, rows in frame.groupby("cutoff", sort=False):
        btyd = create_model("btyd", btyd_params, spec, horizon_days)
        assert isinstance(btyd, BtydModel)
        btyd.fit(rows, FitContext())
        parts.append(pd.concat([rows.reset_index(drop=True), btyd.btyd_inputs(rows)], axis=1))
    return pd.concat(parts, ignore_index=True)


def value_elasticity(events: Path, cutoff: pd.Timestamp, days: float, users: np.ndarray) -> float:
    """k in V(d) ~ d^k: how the users' value after `cutoff` accumulates over `days` (a least-squares
    line through log cumulative value against log days, from day 7 on)."""
    frame = pd.read_parquet(events, columns=["user_id", "ts", "behavior", "amount"])
    frame = frame[(frame["behavior"] == "buy") & frame["user_id"].isin(users)]
    after = (frame["ts"] - cutoff).dt.total_seconds() / 86400.0
    kept = (after >= 0) & (after < days)
    daily = pd.Series(frame.loc[kept, "amount"].to_numpy(), index=np.floor(after[kept]).astype(int))
    cumulative = daily.groupby(level=0).sum().reindex(range(int(days)), fill_value=0.0).cumsum()
    d = np.arange(1, int(days) + 1, dtype=np.float64)
    take = d >= 7
    return float(np.polyfit(np.log(d[take]), np.log(cumulative.to_numpy()[take]), 1)[0])


class ElasticGbdt(GbdtModel):
    """gbdt whose training offset scales the label window by d^k (k fixed before fitting)."""

    elasticity = 1.0
    extra_columns: tuple[str, ...] = ()

    @property
    def feature_columns(self) -> list[str]:
        return [*super().feature_columns, *self.extra_columns]

    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, float]:
        # The base class turns label_days into log(d / horizon); d' = horizon * (d / horizon)^k makes
        # that k * log(d / horizon) for value and hazard alike.
        days = exposure_days(train, self.horizon_days)
        scaled = self.horizon_days * (days / self.horizon_days) ** self.elasticity
        return super().fit(train.assign(label_days=scaled), ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a project after `dvc repro evaluate`")
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--ensemble", nargs="+", default=["gbdt", "linear", "mlp", "sequence", "btyd"])
    parser.add_argument("--mlflow-experiment", default="quality-experiments")
    args = parser.parse_args()
    project = args.project.resolve()
    params = load_params(project / "params.yaml")
    features_dir = project / "data" / "features"
    meta = read_meta(features_dir)
    train = read_features(features_dir, "train")
    holdout = read_features(features_dir, "eval")
    seed = params.train.seed
    ctx = FitContext(seed=seed, device="cpu", valid_fraction=params.train.valid_fraction)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    mlflow.set_experiment(args.mlflow_experiment)

    k = 1.0
    if any("elastic" in e for e in args.experiments):
        earliest = train["cutoff"].min()
        days = float(train.loc[train["cutoff"] == earliest, "label_days"].iloc[0])
        k = value_elasticity(project / "data" / "events.parquet", pd.Timestamp(earliest), days,
                             train.loc[train["cutoff"] == earliest, "user_id"].unique())
        print(f"value elasticity k = {k:.3f} (cutoff {earliest}, {days:.0f}-day window)")
    stacked_train = stacked_eval = None
    if any("stacked" in e for e in args.experiments):
        started = time.perf_counter()
        btyd_params = params.train.model_params("btyd")
        stacked_train = with_btyd_inputs(train, btyd_params, meta.spec, meta.horizon_days)
        stacked_eval = with_btyd_inputs(holdout, btyd_params, meta.spec, meta.horizon_days)
        print(f"BTYD inputs per cutoff: {time.perf_counter() - started:.1f} s")

    rows: dict[str, dict[str, float]] = {}
    run_ids: dict[str, str] = {}
    for name in args.experiments:
        with mlflow.start_run(run_name=name) as run:
            started = time.perf_counter()
            if name == "ensemble":
                model = create_model("ensemble", {"members": {m: params.train.model_params(m) for m in args.ensemble}},
                                     meta.spec, meta.horizon_days)
                model.fit(train, ctx)
                _, scores = score_model(model, holdout)
                mlflow.log_param("members", ",".join(args.ensemble))
            else:
                model = ElasticGbdt(GbdtModel.Params(**params.train.model_params("gbdt")), meta.spec,
                                    meta.horizon_days)
                model.elasticity = k if "elastic" in name else 1.0
                model.extra_columns = INPUT_COLUMNS if "stacked" in name else ()
                fit_rows, score_rows = (stacked_train, stacked_eval) if "stacked" in name else (train, holdout)
                summary = model.fit(fit_rows, ctx)
                _, scores = score_model(model, score_rows)
                mlflow.log_params({"elasticity": model.elasticity, "btyd_inputs": bool(model.extra_columns),
                                   **params.train.model_params("gbdt")})
                mlflow.log_metrics({f"fit_{key}": value for key, value in summary.items() if np.isfinite(value)})
            mlflow.log_metrics({f"eval_{key}": value for key, value in scores.items()})
            mlflow.log_metric("seconds", time.perf_counter() - started)
            rows[name], run_ids[name] = scores, run.info.run_id
            print(f"{name}: {time.perf_counter() - started:.1f} s, run {run.info.run_id}")

    keys = list(metrics.VALUE_METRIC_KEYS)
    print("\n| experiment | " + " | ".join(keys) + " | MLflow run |")
    print("|---|" + "---:|" * len(keys) + "---|")
    for name, scores in rows.items():
        print(f"| {name} | " + " | ".join(f"{scores[key]:.4f}" for key in keys) + f" | {run_ids[name]} |")


if __name__ == "__main__":
    main()

"""The evaluate stage: every trained model scored on the same evaluation cutoff -> metrics, plot
data, a comparison table and per-user predictions (DVC outputs), the same in MLflow. `score_model`
is the one way a model is scored on a holdout (the registry's gate uses it too)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from uservalue.config import MetricBound, MetricTarget
from uservalue.errors import InputError
from uservalue.features.store import read_features, read_meta
from uservalue.io import atomic_path, write_json, write_text
from uservalue.lifecycle import metrics, tracking
from uservalue.lifecycle.context import StageContext
from uservalue.models.base import ValueModel
from uservalue.models.catalog import load_model

LABEL_COLUMNS = ("user_id", "value", "bought")


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, dict[str, float]]
    predictions: pd.DataFrame  # long: model, user_id, p_buy, expected_value, value, bought
    gains: pd.DataFrame  # long: model, fraction_users, fraction_value
    deciles: pd.DataFrame  # long: model, decile, n, mean_actual, mean_predicted


@dataclass(frozen=True)
class ChampionChoice:
    champion: str
    eligible: list[str]  # the models meeting every requirement (train.models order)
    requirements_met: bool  # False: no model met them all; the champion is the best by primary alone


def unmet_requirements(row: dict[str, float], requirements: Mapping[str, MetricBound]) -> list[str]:
    """The requirements one model's metrics miss, as readable reasons (empty: it meets them all)."""
    return [f"{metric} {row.get(metric, float('nan')):.4f} misses {bound.direction} {bound.target}"
            for metric, bound in requirements.items() if not bound.holds(row.get(metric))]


def choose_champion(all_metrics: dict[str, dict[str, float]], primary: str,
                    requirements: Mapping[str, MetricBound] | None = None) -> ChampionChoice:
    """The best model by `primary` among those meeting every requirement (evaluate.requirements)."""
    requirements = requirements or {}
    eligible = [name for name, row in all_metrics.items() if not unmet_requirements(row, requirements)]
    pool = eligible or list(all_metrics)
    # Ties go to the model listed first (train.models order), so the choice is deterministic.
    champion = max(pool, key=lambda name: metrics.score(primary, all_metrics[name][primary]))
    return ChampionChoice(champion, eligible, bool(eligible))


def score_model(model: ValueModel, features: pd.DataFrame, where: str | Path = "model") -> tuple[pd.DataFrame, dict[str, float]]:
    """(predictions, metrics) of one model on labelled features: evaluation and the gate's re-score
    of the champion both come through here, so their figures are comparable exactly."""
    actual, bought = _labels(features)
    predicted = model.predict(features)
    if not predicted["user_id"].equals(features["user_id"].astype(str).reset_index(drop=True)):
        raise InputError(where, "predictions are not in the order of the features", column="user_id")
    value_metrics = metrics.value_metrics(actual, predicted["expected_value"].to_numpy(), bought,
                                          predicted["p_buy"].to_numpy())
    return predicted, value_metrics


def _labels(features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    for column in LABEL_COLUMNS:
        if column not in features.columns:
            raise InputError("eval features", "missing label column", column=column)
    return features["value"].to_numpy(dtype="float64"), features["bought"].to_numpy(dtype=bool)


def evaluate_models(names: list[str] | tuple[str, ...], models_dir: Path, features: pd.DataFrame) -> Evaluation:
    all_metrics: dict[str, dict[str, float]] = {}
    predictions, gains, deciles = [], [], []
    actual, bought = _labels(features)
    for name in names:
        model_dir = models_dir / name / "model"
        predicted, all_metrics[name] = score_model(load_model(model_dir), features, model_dir)
        value = predicted["expected_value"].to_numpy()
        predictions.append(predicted.assign(model=name, value=actual, bought=bought))
        gains.append(metrics.gains_curve(actual, value).assign(model=name))
        deciles.append(metrics.decile_table(actual, value).assign(model=name))
    return Evaluation(all_metrics, pd.concat(predictions, ignore_index=True),
                      pd.concat(gains, ignore_index=True), pd.concat(deciles, ignore_index=True))


def comparison_markdown(evaluation: Evaluation, champion: str, primary: str, cutoff: str, horizon: int) -> str:
    keys = list(metrics.VALUE_METRIC_KEYS)
    lines = [
        "# Model comparison",
        "",
        (f"Evaluation cutoff {cutoff}, horizon {horizon} days, {evaluation.predictions['user_id'].nunique()} "
         f"users. Champion by `{primary}`: **{champion}**. Higher is better except mae, rmse, decile_mape "
         "and |total_error|."),
        "",
        "| model | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, row in evaluation.metrics.items():
        mark = " (champion)" if name == champion else ""
        lines.append(f"| {name}{mark} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def targets_markdown(all_metrics: Mapping[str, Mapping[str, float]], targets: Mapping[str, MetricTarget]) -> str:
    """Every model against the quality targets (report.targets) and their anchors: one row per metric,
    each cell the model's figure and whether it meets the target, then how many each model meets."""
    if not targets:
        return ""
    names = list(all_metrics)
    lines = [
        "## Against the anchors and targets",
        "",
        ("`report.targets` in params.yaml; ✓ meets the target, ✗ misses it. The gains curve and the decile "
         "calibration are DVC plots (`dvc plots show`: reports/plots/gains.csv, reports/plots/deciles.csv) "
         "and drawn on reports/index.html."),
        "",
        "| metric | anchor | target | " + " | ".join(names) + " |",
        "|---|---:|---|" + "---:|" * len(names),
    ]
    for metric, goal in targets.items():
        shown = {"min": f">= {goal.target:g}", "max": f"<= {goal.target:g}", "abs": f"within ±{goal.target:g}"}
        anchor = "" if goal.anchor is None else f"{goal.anchor:.4g}"
        cells = [f"{all_metrics[n][metric]:.4f} {'✓' if goal.holds(all_metrics[n][metric]) else '✗'}" for n in names]
        lines.append(f"| {metric} | {anchor} | {shown[goal.direction]} | " + " | ".join(cells) + " |")
    met = [sum(goal.holds(all_metrics[n][m]) for m, goal in targets.items()) for n in names]
    lines.append("| met | | | " + " | ".join(f"{k}/{len(targets)}" for k in met) + " |")
    return "\n".join(lines) + "\n"


def _plot_pngs(evaluation: Evaluation, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, curve in evaluation.gains.groupby("model", sort=False):
        ax.plot(curve["fraction_users"], curve["fraction_value"], label=name)
    ax.plot([0, 1], [0, 1], "k:", label="random")
    ax.set(xlabel="share of users (by predicted value)", ylabel="share of actual value", title="Gains")
    ax.legend()
    paths.append(out_dir / "gains.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, table in evaluation.deciles.groupby("model", sort=False):
        ax.plot(table["mean_actual"], table["mean_predicted"], marker="o", label=name)
    top = float(evaluation.deciles[["mean_actual", "mean_predicted"]].max().max())
    ax.plot([0, top], [0, top], "k:", label="perfect")
    ax.set(xlabel="mean actual value (decile)", ylabel="mean predicted value (decile)", title="Decile calibration")
    ax.legend()
    paths.append(out_dir / "decile_calibration.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def run_evaluate(ctx: StageContext, features_dir: str | Path, models_dir: str | Path, metrics_path: str | Path,
                 plots_dir: str | Path, table_path: str | Path, predictions_path: str | Path) -> dict[str, Any]:
    params = ctx.params
    features_dir, models_dir, plots_dir = Path(features_dir), Path(models_dir), Path(plots_dir)
    meta = read_meta(features_dir)
    features = read_features(features_dir, "eval")
    evaluation = evaluate_models(params.train.models, models_dir, features)
    primary = params.evaluate.primary_metric
    choice = choose_champion(evaluation.metrics, primary, params.evaluate.requirements)
    champion = choice.champion
    cutoff = meta.eval_cutoff.isoformat()
    runs = {name: json.loads((models_dir / name / "run.json").read_text()) for name in params.train.models}
    report = {
        "models": evaluation.metrics,
        "champion": champion,
        "primary_metric": primary,
        "requirements": {m: b.model_dump() for m, b in params.evaluate.requirements.items()},
        "eligible": choice.eligible,
        "requirements_met": choice.requirements_met,
        "eval_cutoff": cutoff,
        "horizon_days": meta.horizon_days,
        "users": len(features),
        "features_md5": tracking.dvc_output_hashes(ctx.root, "featurize").get("data/features", ""),
        "runs": {name: run["run_id"] for name, run in runs.items()},
    }

    plots_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in (("gains", evaluation.gains), ("deciles", evaluation.deciles)):
        # Wide tables: one column per model, so DVC draws one series per model.
        index = "fraction_users" if name == "gains" else "decile"
        column = "fraction_value" if name == "gains" else "mean_predicted"
        wide = frame.pivot(index=index, columns="model", values=column)[list(params.train.models)].reset_index()
        with atomic_path(plots_dir / f"{name}.csv") as tmp:
            wide.to_csv(tmp, index=False)
    # The truth per decile of the champion's ranking, drawn beside the models' predictions.
    actual = evaluation.deciles[evaluation.deciles["model"] == champion][["decile", "mean_actual"]]
    with atomic_path(plots_dir / "deciles_actual.csv") as tmp:
        actual.rename(columns={"mean_actual": "actual"}).to_csv(tmp, index=False)
    from uservalue.lifecycle.influence_report import influence_section  # the evaluate stage's alone

    write_text(table_path, comparison_markdown(evaluation, champion, primary, cutoff, meta.horizon_days)
               + "\n" + targets_markdown(evaluation.metrics, params.report.targets)
               + "\n" + influence_section(params, models_dir))
    with atomic_path(predictions_path) as tmp:
        evaluation.predictions.to_parquet(tmp, index=False)

    ctx.tracking()
    client = mlflow.MlflowClient()
    for name, run in runs.items():
        for key, value in evaluation.metrics[name].items():
            client.log_metric(run["run_id"], f"eval_{key}", value)
    with mlflow.start_run(run_name="evaluate"):
        mlflow.set_tags({"stage": "evaluate", "champion": champion, **tracking.lineage_tags(ctx.root, "featurize")})
        mlflow.log_metrics({f"{name}.{k}": v for name, row in evaluation.metrics.items() for k, v in row.items()})
        with tempfile.TemporaryDirectory() as pngs:  # images go to MLflow only; DVC plots the CSVs
            for path in _plot_pngs(evaluation, Path(pngs)):
                mlflow.log_artifact(str(path), "plots")
        mlflow.log_artifact(str(plots_dir / "gains.csv"), "plots")
        mlflow.log_artifact(str(plots_dir / "deciles.csv"), "plots")
        mlflow.log_artifact(str(table_path))
        mlflow.log_dict(report, "metrics.json")
    write_json(metrics_path, report)
    return report

"""The train_recs stage: every recommender of params `recs.models` fitted on the events before
split.eval_cutoff and scored on the split.horizon_days after it (uservalue.recs.evaluate), each tracked
in MLflow; the best is logged as an MLflow model and registered as `recs.model_name` through the gate
(uservalue.lifecycle.recs_registry). Writes models/recs/<kind>/, reports/recs_metrics.json, a comparison
table and the registry decision."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from uservalue.errors import InputError
from uservalue.io import atomic_dir, write_json, write_text
from uservalue.lifecycle import tracking
from uservalue.lifecycle.context import StageContext
from uservalue.recs.base import HISTORY_COLUMNS, OPTIONAL_COLUMNS, FitOptions, Recommender
from uservalue.recs.catalog import create_recommender
from uservalue.recs.evaluate import (
    METRIC_KEYS,
    TimeSplit,
    evaluate_recommender,
    evaluate_truth,
    time_split,
)

TRUTH_ENTRY = "planted_truth"


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """A Recommender as an MLflow pyfunc: events in (HISTORY_COLUMNS), one row per (user, rank) out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from uservalue.recs.base import load_recommender

        self.model = load_recommender(context.artifacts["model"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        recs = self.model.recommend(model_input, int(params.get("k", 20)), bool(params.get("exclude_bought", True)))
        return pd.DataFrame([{"user_id": r.user_id, "rank": rank + 1, "item_id": item, "score": score}
                             for r in recs for rank, (item, score) in enumerate(zip(r.items, r.scores, strict=True))],
                            columns=["user_id", "rank", "item_id", "score"])


def read_events(path: Path, until: pd.Timestamp, max_users: int | None = None, seed: int = 0) -> pd.DataFrame:
    """The canonical events before `until`, with the columns a recommender reads; with `max_users`, only
    those of at most that many users (sample_user_ids), filtered while the file is scanned."""
    if not path.is_file():
        raise InputError(path, "file does not exist", expected="canonical events (Parquet), the validate stage's output")
    dataset = ds.dataset(path)
    columns = [c for c in (*HISTORY_COLUMNS, *OPTIONAL_COLUMNS) if c in dataset.schema.names]
    missing = [c for c in HISTORY_COLUMNS if c not in columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}", column=missing[0], expected=f"columns {list(HISTORY_COLUMNS)}")
    bound = pa.scalar(until.to_pydatetime(), type=dataset.schema.field("ts").type)
    keep = ds.field("ts") < bound
    sample = sample_user_ids(dataset, keep, max_users, seed)
    if sample is not None:
        keep = keep & ds.field("user_id").isin(pa.array(sample, type=dataset.schema.field("user_id").type))
    return dataset.to_table(columns=columns, filter=keep).to_pandas()


def sample_user_ids(dataset: ds.Dataset, keep: ds.Expression, max_users: int | None, seed: int) -> list[str] | None:
    """At most `max_users` of the users with events that `keep` selects, drawn with `seed` from their sorted
    ids (the same sample whatever the file's order); None when they are fewer (no sampling). The ids are
    collected batch by batch: only the distinct users are held, never the events."""
    if max_users is None:
        return None
    users: set[str] = set()
    for batch in dataset.to_batches(columns=["user_id"], filter=keep):
        users.update(pc.unique(batch.column(0)).to_pylist())
    if len(users) <= max_users:
        return None
    ordered = sorted(users)
    chosen = np.random.default_rng(seed).choice(len(ordered), max_users, replace=False)
    return sorted(ordered[i] for i in chosen)


def log_recommender(model_dir: Path) -> Any:
    """Log a saved Recommender as an MLflow model; its files land in `artifacts/model/` (MLflow names an
    artifact directory by its base name, so it is copied under that name first)."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        shutil.copytree(model_dir, staged)
        return mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("recs_pyfunc.py")),
                                       artifacts={"model": str(staged)}, pip_requirements=tracking.pip_requirements())


def comparison_table(report: dict[str, Any]) -> str:
    rows = [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in METRIC_KEYS) + f" | {m.get('fit_seconds', 0):.1f} |"
            for name, m in report["models"].items()]
    if report.get(TRUTH_ENTRY):
        truth = report[TRUTH_ENTRY]
        rows.append(f"| *{TRUTH_ENTRY}* | " + " | ".join(f"{truth[k]:.4f}" for k in METRIC_KEYS) + " | |")
    head = ("## Recommendations (top-K, time split)\n\n"
            f"Fitted on events before {report['eval_cutoff']}, scored on the items of each user's events in the "
            f"{report['horizon_days']} days after it ({report['users']} users); champion by "
            f"{report['primary_metric']}: **{report['champion']}**.\n\n"
            "| model | " + " | ".join(METRIC_KEYS) + " | fit s |\n|" + "---|" * (len(METRIC_KEYS) + 2) + "\n")
    ratios = report.get("ratios", {})
    tail = "".join(f"\n{k}: {v:.2f}" for k, v in ratios.items())
    return head + "\n".join(rows) + "\n" + (tail + "\n" if tail else "")


def run_train_recs(ctx: StageContext, events_path: str | Path, truth_dir: str | Path | None, models_dir: str | Path,
                   metrics_out: str | Path, table_out: str | Path, registry_out: str | Path,
                   split_path: str | Path | None = None,
                   log_metrics_hook: Callable[[dict[str, float], int], None] | None = None) -> dict[str, Any]:
    """`split_path`: the featurize stage's resolved split (reports/split.json); None: params `split`, which must
    then name its cutoff and horizon (not `auto`)."""
    params = ctx.params
    split_params = params.split
    if split_path is not None and Path(split_path).is_file():
        from uservalue.data.window import read_split_record

        split_params = read_split_record(split_path)
    cfg, cutoff, horizon = params.recs, split_params.eval_cutoff_utc, int(split_params.horizon_days)
    until = pd.Timestamp(cutoff) + pd.Timedelta(days=horizon)
    events = read_events(Path(events_path), until, cfg.max_train_users, params.train.seed)
    if not events["item_id"].notna().any():  # e.g. CDNOW: purchases without items, nothing to recommend
        return _no_items(events_path, cutoff, horizon, models_dir, metrics_out, table_out, registry_out, cfg.model_name)
    split = time_split(events, cutoff, horizon, exclude_bought=cfg.exclude_bought,
                       truth_behaviors=cfg.truth_behaviors, max_users=cfg.max_eval_users, seed=params.train.seed)
    if not split.truth:
        raise InputError(events_path, f"no user has events both before {cutoff.isoformat()} and in the "
                                      f"{horizon} days after it", column="ts", expected="users active across the cutoff")

    experiment_id = ctx.tracking()
    tracking.fail_orphan_runs(experiment_id)
    fitted: dict[str, Recommender] = {}
    results: dict[str, dict[str, float]] = {}
    runs: dict[str, str] = {}
    models_dir = Path(models_dir)
    with atomic_dir(models_dir) as tmp:
        for kind, model_params in cfg.models.items():
            model = create_recommender(kind, model_params)
            with mlflow.start_run(run_name=f"train-recs-{kind}") as run:
                mlflow.set_tags({"stage": "train_recs", "model": kind, **tracking.process_tags(),
                                 **tracking.lineage_tags(ctx.root, "validate")})
                mlflow.log_params({**tracking.flatten(f"recs.{kind}", model.params),
                                   "split.eval_cutoff": cutoff.isoformat(), "split.horizon_days": horizon,
                                   "recs.exclude_bought": cfg.exclude_bought, "train.seed": params.train.seed,
                                   "recs.max_train_users": cfg.max_train_users})

                def log_epoch(metrics: dict[str, float], step: int) -> None:
                    mlflow.log_metrics(metrics, step=step)
                    if log_metrics_hook is not None:
                        log_metrics_hook(metrics, step)

                started = time.perf_counter()
                summary = model.fit(events, cutoff, FitOptions(params.train.seed, params.train.device, log_epoch))
                seconds = time.perf_counter() - started
                metrics = evaluate_recommender(model, split)
                mlflow.log_metrics({**{f"fit_{k}": v for k, v in summary.items()}, "fit_seconds": seconds, **metrics})
                model.save(tmp / kind)
            fitted[kind], runs[kind] = model, run.info.run_id
            results[kind] = {**metrics, "fit_seconds": seconds}
    truth_metrics = _truth_metrics(truth_dir, split)
    primary = cfg.primary_metric
    champion = max(results, key=lambda k: (results[k][primary], k == "nextitem"))
    with mlflow.start_run(run_id=runs[champion]):
        info = log_recommender(models_dir / champion)
    report = {
        "eval_cutoff": cutoff.isoformat(), "horizon_days": horizon, "users": len(split.truth),
        "catalog_items": split.catalog_items, "exclude_bought": cfg.exclude_bought,
        "train_users": int(events["user_id"].nunique()), "max_train_users": cfg.max_train_users,
        "primary_metric": primary, "champion": champion, "models": results, TRUTH_ENTRY: truth_metrics,
        "ratios": _ratios(results, champion, primary, truth_metrics),
    }
    write_json(metrics_out, report)
    write_text(table_out, comparison_table(report))

    from uservalue.lifecycle.recs_registry import register_recs

    record = register_recs(ctx, cutoff, champion, {k: results[champion][k] for k in METRIC_KEYS}, runs[champion],
                           info.model_uri, lambda m: {k: v for k, v in evaluate_recommender(m, split).items()
                                                      if k in METRIC_KEYS})
    write_json(registry_out, record)
    return {"report": report, "registry": record}


def _no_items(events_path: str | Path, cutoff: Any, horizon: int, models_dir: str | Path, metrics_out: str | Path,
              table_out: str | Path, registry_out: str | Path, model_name: str) -> dict[str, Any]:
    """A log without item ids: the stage's outputs say so; nothing is trained or registered (the package stage
    then builds the Bento without a recommender, and /recommend answers 503)."""
    reason = f"{events_path}: no event has an item_id, so there is nothing to recommend"
    with atomic_dir(models_dir) as tmp:
        write_json(tmp / "skipped.json", {"reason": reason})
    report = {"eval_cutoff": cutoff.isoformat(), "horizon_days": horizon, "skipped": reason, "models": {},
              "champion": None}
    write_json(metrics_out, report)
    write_text(table_out, f"## Recommendations (top-K, time split)\n\nSkipped: {reason}.\n")
    record = {"model_name": model_name, "skipped": reason, "candidate": None, "champion_version": None}
    write_json(registry_out, record)
    return {"report": report, "registry": record}


def _truth_metrics(truth_dir: str | Path | None, split: TimeSplit) -> dict[str, float] | None:
    """The planted truth's own ranking scored like the models (synthetic data with affinity), else None."""
    if truth_dir is None:
        return None
    meta_path = Path(truth_dir) / "truth.json"
    if not meta_path.is_file() or not (json.loads(meta_path.read_text()).get("affinity") or {}).get("strength"):
        return None
    return evaluate_truth(str(truth_dir), split)


def _ratios(results: dict[str, dict[str, float]], champion: str, primary: str,
            truth: dict[str, float] | None) -> dict[str, float]:
    best = results[champion][primary]
    ratios = {}
    if "popularity" in results and results["popularity"][primary] > 0:
        ratios[f"{primary} champion / popularity"] = best / results["popularity"][primary]
    if truth and truth[primary] > 0:
        ratios[f"{primary} champion / planted truth"] = best / truth[primary]
    return ratios

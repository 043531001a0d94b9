"""The monitor stage: Evidently drift of the champion's predictions and key features, current window
against the evaluation-time reference, as an HTML report and a JSON verdict (docs/monitoring.md).

Like is compared with like: the default batch window scores the events at the reference's cutoff, moved on
by as much as the log has grown (`batch_as_of`), so an unchanged log is not flagged for its users' age."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from uservalue.config import MonitorParams
from uservalue.duck import sql_string
from uservalue.errors import InputError
from uservalue.io import atomic_path, write_json
from uservalue.lifecycle.context import StageContext


def _columns(frame: pd.DataFrame, cfg: MonitorParams, name: str) -> list[str]:
    wanted = [*cfg.prediction_columns, *cfg.feature_columns]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise InputError(name, f"missing monitored columns {missing}", expected=f"columns {wanted}")
    return wanted


def finite_window(frame: pd.DataFrame, columns: list[str], name: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows whose monitored columns are finite numbers, and per column how many rows were not (a value
    outside float range, e.g. an absurd amount logged before the service's limits, must not stop the
    monitor: it is counted in the verdict). A column that is not numeric is an InputError naming it."""
    values = {}
    for column in columns:
        converted = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        if converted.isna().all() and frame[column].notna().any():
            raise InputError(name, f"column {column!r} is not numeric", column=column, expected="numbers")
        values[column] = converted
    data = pd.DataFrame(values, index=frame.index)
    finite = np.isfinite(data.to_numpy())
    dropped = {c: int((~finite[:, i]).sum()) for i, c in enumerate(columns) if not finite[:, i].all()}
    return data[finite.all(axis=1)], dropped


def sample_window(frame: pd.DataFrame, max_rows: int | None, seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """At most `max_rows` rows of a window, drawn uniformly without replacement with a fixed seed (Evidently
    holds both windows in memory, so 10^6 scored users are compared on a sample), and what was done.
    A distance between distributions changes little at 10^5 rows, while the memory and time fall tenfold."""
    if max_rows is None or len(frame) <= max_rows:
        return frame, {"rows": len(frame), "used": len(frame)}
    rows = np.random.default_rng(seed).choice(len(frame), size=max_rows, replace=False)
    return frame.iloc[np.sort(rows)], {"rows": len(frame), "used": max_rows}


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorParams) -> tuple[Any, dict[str, Any]]:
    """(Evidently snapshot, verdict) for two windows of predictions and features; rows with a non-finite
    monitored value are left out of both windows and counted under `non_finite_rows`."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    columns = _columns(reference, cfg, "reference")
    _columns(current, cfg, "current")
    reference, reference_dropped = finite_window(reference, columns, "reference")
    current, current_dropped = finite_window(current, columns, "current")
    if len(current) < cfg.min_rows:
        left_out = f" ({sum(current_dropped.values())} non-finite values left out: {current_dropped})" \
            if current_dropped else ""
        raise InputError("current", f"only {len(current)} rows with finite values{left_out}",
                         expected=f"at least monitor.min_rows={cfg.min_rows}")
    reference, reference_sampled = sample_window(reference, cfg.max_rows, cfg.seed)
    current, current_sampled = sample_window(current, cfg.max_rows, cfg.seed)
    preset = DataDriftPreset(columns=columns, drift_share=cfg.drift_share, num_method=cfg.method,
                             num_threshold=cfg.column_threshold, include_tests=False)
    snapshot = Report([preset]).run(current_data=current, reference_data=reference)
    per_column: dict[str, dict[str, Any]] = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config["type"].endswith("ValueDrift"):
            score = float(metric["value"])
            per_column[config["column"]] = {
                "score": score,
                "method": config["method"],
                "threshold": config["threshold"],
                "drifted": score >= config["threshold"],
            }
    drifted = [c for c, row in per_column.items() if row["drifted"]]
    share = len(drifted) / len(per_column)
    prediction_drift = {c: per_column[c] for c in cfg.prediction_columns}
    verdict = {
        "drift_detected": share >= cfg.drift_share or any(row["drifted"] for row in prediction_drift.values()),
        "drifted_share": share,
        "drifted_columns": drifted,
        "prediction_drift": prediction_drift,
        "columns": per_column,
        "non_finite_rows": {"reference": reference_dropped, "current": current_dropped},
        "sampled": {"max_rows": cfg.max_rows, "seed": cfg.seed, "reference": reference_sampled,
                    "current": current_sampled},
        "thresholds": {"method": cfg.method, "column_threshold": cfg.column_threshold, "drift_share": cfg.drift_share},
    }
    return snapshot, verdict


def write_monitoring(snapshot: Any, verdict: dict[str, Any], out_dir: str | Path, now: dt.datetime) -> Path:
    """`<out_dir>/<date>.html` (the Evidently report) and `<out_dir>/latest.json` (the verdict)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html = out_dir / f"{now.date().isoformat()}.html"
    with atomic_path(html) as tmp:
        snapshot.save_html(str(tmp.with_suffix(".html")))
        tmp.with_suffix(".html").replace(tmp)
    write_json(out_dir / "latest.json", {**verdict, "report": html.name, "created": now.isoformat()})
    return html


def default_as_of(events: pd.DataFrame | str | Path) -> dt.datetime:
    """The day after the last event: "now" for a log that has stopped growing."""
    import duckdb

    if isinstance(events, pd.DataFrame):
        last = events["ts"].max()
    else:
        last = duckdb.sql(f"SELECT max(ts) FROM read_parquet({sql_string(str(events))})").fetchall()[0][0]
    if last is None or pd.isna(last):
        raise InputError(str(events), "no events", expected="at least one event to score")
    last = pd.Timestamp(last).tz_convert("UTC") if pd.Timestamp(last).tzinfo else pd.Timestamp(last, tz="UTC")
    return (last.floor("D") + pd.Timedelta(days=1)).to_pydatetime()


def batch_as_of(cfg: MonitorParams, events: str | Path, reference_cutoff: dt.datetime | None,
                reference_last_event: dt.datetime | None = None) -> tuple[dt.datetime, str]:
    """When the batch monitor scores the events, and why (monitor.as_of):

    - a time: that time;
    - `latest`: the day after the last event (a cohort that has aged since the reference drifts by age alone);
    - null (like with like): the reference's cutoff moved on by as many days as the log has grown since the
      features were built (`reference_last_event`, from reports/split.json), so both windows sit at the same
      distance from the end of their log; an unchanged log is scored at the reference's own cutoff. Without a
      reference cutoff (no evaluation features), the day after the last event.
    """
    from uservalue.data.window import floor_day, time_range

    if isinstance(cfg.as_of, dt.datetime):
        as_of = cfg.as_of if cfg.as_of.tzinfo else cfg.as_of.replace(tzinfo=dt.UTC)
        return as_of, "monitor.as_of"
    if cfg.as_of == "latest" or reference_cutoff is None:
        return default_as_of(events), "the day after the last event" + (
            " (monitor.as_of: latest)" if cfg.as_of == "latest" else " (no reference cutoff)")
    reference_cutoff = reference_cutoff if reference_cutoff.tzinfo else reference_cutoff.replace(tzinfo=dt.UTC)
    if reference_last_event is None:
        return reference_cutoff, "the reference's cutoff (like with like; no record of the log it was built from)"
    shift = floor_day(time_range(events)[1]) - floor_day(reference_last_event)
    return reference_cutoff + shift, (f"the reference's cutoff moved on by {shift.days} days, as much as the log "
                                      "grew since featurize (like with like)")


def current_window(cfg: MonitorParams, model: Any, events: Path, log_dir: Path, now: dt.datetime,
                   reference_cutoff: dt.datetime | None = None, reference_last_event: dt.datetime | None = None
                   ) -> tuple[pd.DataFrame, dict]:
    """The predictions to compare with the reference: a freshly scored batch (at `batch_as_of`) or the
    prediction log."""
    from uservalue.serving.prediction_log import read_prediction_log
    from uservalue.serving.scorer import score_events

    if cfg.current == "log":
        since = now - dt.timedelta(days=cfg.log_days)
        frame = read_prediction_log(log_dir, since=since, until=now)
        if frame.empty:
            raise InputError(log_dir, f"no predictions logged since {since.isoformat()}",
                             expected=f"at least monitor.min_rows={cfg.min_rows} served predictions "
                                      f"(monitor.log_days={cfg.log_days})")
        return frame, {"source": "prediction_log", "path": str(log_dir), "since": since.isoformat(),
                       "until": now.isoformat(), "rows": len(frame),
                       "model_versions": sorted(map(str, frame["model_version"].unique()))}
    if not events.is_file():
        raise InputError(events, "file does not exist", expected="validated events to score")
    as_of, rule = batch_as_of(cfg, events, reference_cutoff, reference_last_event)
    frame = score_events(model, events, as_of)
    return frame, {"source": "batch", "path": str(events), "as_of": as_of.isoformat(), "as_of_rule": rule,
                   "rows": len(frame)}


def reference_log_end(split_record: str | Path | None) -> dt.datetime | None:
    """The last event of the log the evaluation features were built from (reports/split.json), if recorded."""
    import json

    if split_record is None or not Path(split_record).is_file():
        return None
    try:
        last = (json.loads(Path(split_record).read_text()).get("log") or {}).get("last_event")
        return pd.Timestamp(last).to_pydatetime() if last else None
    except ValueError as error:
        raise InputError(split_record, f"not a split record ({error})", column="log.last_event",
                         expected="JSON written by `uservalue featurize --split-out`") from None


def read_feature_table(features_dir: Path, split: str) -> Any:
    """A feature set as an Arrow table (~1/3 of its pandas size: list columns stay flat buffers)."""
    import pyarrow.parquet as pq

    path = features_dir / f"{split}.parquet"
    if not path.is_file():
        raise InputError(path, f"{split} features are missing", expected="the featurize stage's output")
    return pq.read_table(path)


def run_monitor(ctx: StageContext, events: str | Path, features_dir: str | Path, log_dir: str | Path,
                out_dir: str | Path, now: dt.datetime | None = None,
                split_record: str | Path | None = None) -> dict[str, Any]:
    """The monitor stage: champion predictions on the evaluation features (reference) against the
    current window; Evidently report and verdict to `out_dir`, and both to an MLflow run. `split_record`
    (reports/split.json) says which log the features were built from (the batch window's alignment)."""
    import mlflow

    from uservalue.lifecycle import tracking
    from uservalue.lifecycle.registry import load_registered
    from uservalue.serving.scorer import score_table

    params = ctx.params
    now = now or dt.datetime.now(dt.UTC)
    model, info = load_registered(ctx)
    # The evaluation features as Arrow, scored in batches and let go before the current window is built
    # (issue 13: 10^6 users' features as one DataFrame are ~3 GiB).
    eval_features = read_feature_table(Path(features_dir), "eval")
    reference = score_table(model, eval_features)
    first_cutoff = pd.Timestamp(eval_features.column("cutoff")[0].as_py()) if eval_features.num_rows else None
    reference_cutoff = first_cutoff.to_pydatetime() if first_cutoff is not None else None
    del eval_features
    current, current_meta = current_window(params.monitor, model, Path(events), Path(log_dir), now,
                                           reference_cutoff, reference_log_end(split_record))
    snapshot, verdict = drift_report(reference, current, params.monitor)
    verdict = {
        **verdict,
        "model": {"name": info.name, "version": info.version, "run_id": info.run_id, "type": info.model_type},
        "reference": {"source": "evaluation features", "path": str(Path(features_dir) / "eval.parquet"),
                      "cutoff": str(first_cutoff) if first_cutoff is not None else None,
                      "rows": len(reference)},
        "current": current_meta,
    }
    tracking.fail_orphan_runs(ctx.tracking())
    with mlflow.start_run(run_name="monitor") as run:
        verdict["mlflow_run_id"] = run.info.run_id
        html = write_monitoring(snapshot, verdict, out_dir, now)
        mlflow.set_tags({"stage": "monitor", "model_version": info.version, "current_source": current_meta["source"],
                         "drift_detected": str(verdict["drift_detected"]).lower(), **tracking.run_context_tags(),
                         **tracking.process_tags()})
        mlflow.log_metrics({"drift_detected": float(verdict["drift_detected"]),
                            "drifted_share": verdict["drifted_share"],
                            **{f"drift_{c}": row["score"] for c, row in verdict["columns"].items()}})
        mlflow.log_artifact(str(html), "monitoring")
        mlflow.log_artifact(str(Path(out_dir) / "latest.json"), "monitoring")
    return verdict

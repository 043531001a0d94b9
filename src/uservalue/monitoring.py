"""Drift of the predictions and key features between a reference window (the evaluation run's
predictions and features) and a current window, with Evidently 0.7's Report API.

Every column is compared with one distance (`monitor.method`, Wasserstein by default), so "drifted"
always means distance >= `monitor.column_threshold`, whatever the sample size (Evidently's default
switches between p-values and distances by size, which would flip the comparison). The verdict
flags drift when a prediction column drifts or the share of drifted columns reaches
`monitor.drift_share`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd

from uservalue.config import MonitorParams
from uservalue.errors import InputError
from uservalue.io import atomic_path, write_json


def _columns(frame: pd.DataFrame, cfg: MonitorParams, name: str) -> list[str]:
    wanted = [*cfg.prediction_columns, *cfg.feature_columns]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise InputError(name, f"missing monitored columns {missing}", expected=f"columns {wanted}")
    return wanted


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, cfg: MonitorParams) -> tuple[Any, dict[str, Any]]:
    """(Evidently snapshot, verdict) for two windows of predictions and features."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    columns = _columns(reference, cfg, "reference")
    _columns(current, cfg, "current")
    if len(current) < cfg.min_rows:
        raise InputError("current", f"only {len(current)} rows", expected=f"at least monitor.min_rows={cfg.min_rows}")
    preset = DataDriftPreset(columns=columns, drift_share=cfg.drift_share, num_method=cfg.method,
                             num_threshold=cfg.column_threshold, include_tests=False)
    snapshot = Report([preset]).run(current_data=current[columns].astype("float64"),
                                    reference_data=reference[columns].astype("float64"))
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

"""The report stage: what evaluate, register, package, validate and monitor wrote -> reports/index.html
(uservalue.reporting.page), atomically. The champion's git commit comes from its MLflow run's tags."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from uservalue.errors import InputError
from uservalue.io import write_text
from uservalue.lifecycle.context import StageContext
from uservalue.reporting.page import RunOutcome, render_page


def _json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise InputError(f"{path}: missing; the report needs it (run the stage that writes it first)")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") from None


def _csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: missing; the evaluate stage writes it")
    return pd.read_csv(path)


def _relative(target: Path, page: Path) -> str | None:
    return Path(os.path.relpath(target, page.parent)).as_posix() if target.exists() else None


def champion_lineage(ctx: StageContext, metrics: dict[str, Any], registry: dict[str, Any] | None,
                     package: dict[str, Any] | None) -> tuple[dict[str, str], str | None]:
    """(label -> value, MLflow UI link) for the served model: its registry version, run, Bento, the
    features' DVC hash, and the git commit its run recorded."""
    from uservalue.lifecycle.tracking import GIT_COMMIT_TAG, is_store_failure

    lineage: dict[str, str] = {}
    run_id = (package or {}).get("run_id") or ((registry or {}).get("candidate") or {}).get("run_id")
    if package:
        lineage["served model"] = (f"{package['model_name']} version {package['model_version']} "
                                   f"({package['model_type']}, alias {package['model_alias']})")
        lineage["Bento"] = package["bento"]
    if run_id:
        lineage["MLflow run"] = run_id
    lineage["features (DVC hash)"] = str(metrics.get("features_md5", "unknown"))
    link = None
    if run_id:
        import mlflow

        try:
            experiment_id = ctx.tracking()
            run = mlflow.get_run(run_id)
            lineage["git commit"] = run.data.tags.get(GIT_COMMIT_TAG, "not recorded")
            ui = ctx.params.report.mlflow_ui
            link = f"{ui.rstrip('/')}/#/experiments/{run.info.experiment_id or experiment_id}/runs/{run_id}" if ui else None
        except Exception as error:  # the page is still written: it says the store was not reachable
            if not is_store_failure(error) and "not found" not in str(error).lower():
                raise
            lineage["git commit"] = f"unknown (MLflow store: {type(error).__name__})"
    return lineage, link


def run_report(ctx: StageContext, reports_dir: Path, out: Path) -> Path:
    reports = ctx.path(reports_dir)
    page = ctx.path(out)
    metrics = _json(reports / "metrics.json", required=True)
    assert metrics is not None
    registry = _json(reports / "registry.json", required=False)
    package = _json(reports / "package.json", required=False)
    validation = _json(reports / "validation" / "summary.json", required=False)
    monitoring = _json(reports / "monitoring" / "latest.json", required=False)
    recs = _json(reports / "recs_metrics.json", required=False)
    lineage, mlflow_link = champion_lineage(ctx, metrics, registry, package)
    links = {"data_docs": _relative(reports / "validation" / "data_docs" / "index.html", page),
             "drift_report": _relative(reports / "monitoring" / monitoring["report"], page) if monitoring else None,
             "mlflow_run": mlflow_link}
    outcome = RunOutcome(
        metrics=metrics, gains=_csv(reports / "plots" / "gains.csv"), deciles=_csv(reports / "plots" / "deciles.csv"),
        deciles_actual=_csv(reports / "plots" / "deciles_actual.csv"), registry=registry, package=package,
        validation=validation, monitoring=monitoring, recs=recs, lineage=lineage,
        links={k: v for k, v in links.items() if v},
    )
    write_text(page, render_page(outcome, ctx.params.report.targets, dt.datetime.now(dt.UTC)))
    return page

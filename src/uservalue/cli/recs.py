"""The train_recs command: top-K recommenders fitted, evaluated on the time split, the best registered."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uservalue.cli.common import ParamsOption, err, path_option
from uservalue.cli.lifecycle import reports_errors, stage_context


@reports_errors
def train_recs(
    params: ParamsOption = Path("params.yaml"),
    events: Path = path_option("data/validated.parquet", "Canonical events (Parquet), the validate stage's output."),
    truth_dir: Path = path_option("data/truth", "The ingest stage's truth (planted affinities of synthetic data)."),
    models_dir: Path = path_option("models/recs", "One saved recommender per subdirectory."),
    metrics_out: Path = path_option("reports/recs_metrics.json", "Metrics of every recommender."),
    table_out: Path = path_option("reports/recs_comparison.md", "Markdown comparison table."),
    registry_out: Path = path_option("reports/recs_registry.json", "Registry decision record."),
    split: Path = path_option("reports/split.json", "The featurize stage's resolved split (absent: params `split`)."),
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (overrides train.device).")] = None,
) -> None:
    """Fit and evaluate the recommenders (params `recs`), register the best as recs.model_name through the gate."""
    from uservalue.lifecycle.train_recs import run_train_recs

    ctx = stage_context(params, {"train.device": device})
    result = run_train_recs(ctx, events, truth_dir if truth_dir.is_dir() else None, models_dir, metrics_out, table_out,
                            registry_out, split)
    report, record = result["report"], result["registry"]
    if report.get("skipped"):
        err.print(f"train_recs: skipped: {report['skipped']}", markup=False)
        return
    for name, row in report["models"].items():
        err.print(f"train_recs {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()), markup=False)
    if report.get("planted_truth"):
        err.print("train_recs planted truth: " + ", ".join(f"{k}={v:.4f}" for k, v in report["planted_truth"].items()),
                  markup=False)
    err.print(f"train_recs: {record['model_name']} version {record['candidate']['version']} ({report['champion']}) -> "
              f"{record['decision']['alias']}; " + "; ".join(record["decision"]["reasons"]), markup=False)

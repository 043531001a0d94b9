"""`uservalue`: one command per pipeline stage (the DVC stages' entry scripts run the same ones),
plus `generate`, `score`, `serve`, `stage`, `plan` and `airflow`."""

from __future__ import annotations

import typer

from uservalue.cli import data, lifecycle, online, ops, reports

app = typer.Typer(
    name="uservalue",
    help="Predict each user's future value from their behaviour log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for command in (data.ingest, data.validate, online.materialize, data.featurize, data.generate,
                lifecycle.train, lifecycle.evaluate, lifecycle.register, lifecycle.package, lifecycle.score,
                lifecycle.monitor, reports.report, reports.offline_assets, ops.serve, ops.stage, ops.plan, ops.airflow):
    app.command()(command)

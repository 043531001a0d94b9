"""`uservalue`: one command per pipeline stage (the DVC stages' entry scripts run the same ones),
plus `init`, `generate`, `score`, `serve`, `stage`, `plan` and `airflow`."""

from __future__ import annotations

import typer

from uservalue.cli import data, influence, init, lifecycle, online, ops, recs, reports

app = typer.Typer(
    name="uservalue",
    help="Predict each user's future value from their behaviour log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for command in (data.ingest, data.validate, online.materialize, data.featurize, data.generate,
                lifecycle.train, lifecycle.tune, lifecycle.evaluate, lifecycle.register, recs.train_recs, lifecycle.package, lifecycle.score,
                lifecycle.monitor, influence.influence, reports.report, reports.offline_assets, ops.serve, ops.stage, ops.plan, ops.airflow,
                init.init):
    app.command()(command)

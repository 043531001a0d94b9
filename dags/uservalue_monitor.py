"""Airflow DAG `uservalue_monitor`: drift check of the champion's predictions; retrain on drift."""

from __future__ import annotations

import os

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from uservalue.orchestration.airflow_tasks import DVC_POOL, active_runs, project_dir, retry_args, run_stage

RETRAIN_DAG_ID = "uservalue_retrain"
# A cron expression or preset; USERVALUE_MONITOR_SCHEDULE=none turns the schedule off.
SCHEDULE = os.environ.get("USERVALUE_MONITOR_SCHEDULE", "@daily")
VERDICT = "reports/monitoring/latest.json"

DOC_MD = f"""
### uservalue_monitor

Runs on a schedule (`{SCHEDULE}`; set `USERVALUE_MONITOR_SCHEDULE` to change it). While a
`{RETRAIN_DAG_ID}` run is queued or running, **retrain_idle** skips the check (that retrain is
re-deriving the reference; the next run monitors its champion). With **refresh_data** on, it first brings in new events (DVC stages **ingest** and **validate**, which
only re-run when the raw data or their params changed), then always re-runs the **monitor** stage:
an Evidently drift report of the champion's predictions and key features, current window
(params `monitor.current`: a freshly scored batch, or the service's prediction log) against the
evaluation-time reference. The verdict is `{VERDICT}` in the project; the HTML report is next to
it and in MLflow.

**check_drift** branches on the verdict: on drift, **trigger_retrain** starts `{RETRAIN_DAG_ID}`
with a conf whose `reason` says what drifted; otherwise **no_drift** ends the run.
"""

with DAG(
    dag_id="uservalue_monitor",
    description="Evidently drift check of the champion's predictions; triggers uservalue_retrain on drift",
    doc_md=DOC_MD,
    schedule=None if SCHEDULE.lower() == "none" else SCHEDULE,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "refresh_data": Param(True, type="boolean", title="Refresh data",
                              description="run ingest and validate first, so a batch monitor sees new events"),
    },
    tags=["uservalue", "dvc", "evidently", "monitoring"],
) as dag:

    @task.short_circuit
    def retrain_idle() -> bool:
        """No monitoring while a retrain works in the same workspace (it would re-ingest under its feet)."""
        busy = active_runs(RETRAIN_DAG_ID)
        if busy:
            print(f"{busy} {RETRAIN_DAG_ID} run(s) queued or running: skipping this check")
        return busy == 0

    def refresh_task(stage: str, retries: int):
        @task(task_id=stage, pool=DVC_POOL, **retry_args(retries))
        def _run() -> None:
            if not get_current_context()["params"]["refresh_data"]:
                raise AirflowSkipException("refresh_data is off: monitoring the data already validated")
            run_stage(stage)

        return _run()

    # Monitoring depends on time ("now", the prediction log), not only on DVC's deps: always re-run.
    @task(pool=DVC_POOL, trigger_rule="none_failed", **retry_args(1))
    def monitor() -> None:
        run_stage("monitor", force_stage=True)

    @task.branch
    def check_drift() -> str:
        """The verdict of the monitor stage -> which branch runs; the reason goes to XCom for the trigger."""
        import json

        path = project_dir() / VERDICT
        verdict = json.loads(path.read_text())
        drifted = verdict.get("drifted_columns") or [name for name, column in verdict.get("columns", {}).items()
                                                     if column.get("drifted")]
        summary = (f"drift_detected={verdict['drift_detected']} drifted_share={verdict['drifted_share']:.2f} "
                   f"drifted columns: {', '.join(drifted) or 'none'} (model version "
                   f"{verdict.get('model', {}).get('version', '?')}; MLflow run {verdict.get('mlflow_run_id')})")
        print(f"verdict {path}: {summary}")
        context = get_current_context()
        context["ti"].xcom_push(key="reason", value=f"drift detected by uservalue_monitor run {context['run_id']}: {summary}")
        return "trigger_retrain" if verdict["drift_detected"] else "no_drift"

    trigger_retrain = TriggerDagRunOperator(
        task_id="trigger_retrain",
        trigger_dag_id=RETRAIN_DAG_ID,
        conf={"reason": "{{ ti.xcom_pull(task_ids='check_drift', key='reason') }}"},
        wait_for_completion=False,
    )
    no_drift = EmptyOperator(task_id="no_drift")

    ingest = refresh_task("ingest", retries=2)
    validate = refresh_task("validate", retries=0)
    retrain_idle() >> ingest >> validate >> monitor() >> check_drift() >> [trigger_retrain, no_drift]

"""Airflow DAG `uservalue_retrain`: the DVC pipeline of the project, one task per stage."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param, get_current_context, task

from uservalue.orchestration.airflow_tasks import (
    DVC_POOL,
    active_runs,
    overrides_from_conf,
    retry_args,
    run_stage,
    run_uservalue,
    uservalue_command,
)

MONITOR_DAG_ID = "uservalue_monitor"

DOC_MD = """
### uservalue_retrain

Re-runs the project's DVC pipeline, one task per stage, in the project workspace
(`USERVALUE_PROJECT_DIR`, else the Airflow Variable `uservalue_project_dir`, else the folder above
`dags/`): **monitor_idle** (a sensor: while a `uservalue_monitor` run is running, it checks again
every minute without holding a worker slot) **→ plan** (checks the conf) **→ ingest → validate**
(Great Expectations) **→ materialize** (the online store of per-user events) **→ embed_items** (item text
vectors; nothing to do for a log without text) **→ featurize → train** (one mapped task per model, `train@<model>`)
**→ evaluate → register** (MLflow registry, gated promotion to `@champion`) **→ package**
(BentoML model + Bento of the champion).

Each task is `dvc repro --single-item <stage>`: DVC skips what is up to date (tick **force** to
re-run anyway) and keeps `dvc.lock`. Stage tasks share the pool `uservalue_dvc` (one slot), so two
DVC commands never run at once in the workspace, this DAG's or `uservalue_monitor`'s.

**Trigger DAG w/ config**: every field is optional; a filled one overrides params.yaml for this run
only (the workspace's params.yaml is unchanged afterwards; `dvc.lock` records what was used).
Only transient failures (a store, a lock, a build; a killed stage) are retried. Bad input and a
validation failure are final (no retry); the validate task's log lists the failed expectations and
links the report in `reports/validation/`. The previous champion and Bento stay in place
whenever a run fails or the new model does not pass the registry's gate.
"""

with DAG(
    dag_id="uservalue_retrain",
    description="Retrain: DVC stages ingest -> validate -> materialize -> embed_items -> featurize -> train@<model> -> evaluate -> register -> train_recs -> package",
    doc_md=DOC_MD,
    schedule=None,  # triggered: from the UI, the REST API or uservalue_monitor on drift
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "data_source": Param(None, type=["null", "string"], enum=[None, "cdnow", "taobao", "synthetic", "file"],
                             title="Data source", description="data.source: where ingest reads events"),
        "data_path": Param(None, type=["null", "string"], title="Data path",
                           description="data.path: the file read by the taobao and file sources (under data/raw/)"),
        "eval_cutoff": Param(None, type=["null", "string"], pattern=r"^\d{4}-\d{2}-\d{2}$", title="Evaluation cutoff",
                             description="split.eval_cutoff (YYYY-MM-DD): models are scored on what follows it"),
        "models": Param(None, type=["null", "array"], items={"type": "string"}, title="Models to train",
                        description="train.models, e.g. linear, mlp, sequence (empty: params.yaml's list)"),
        "params": Param({}, type="object", title="Other params",
                        description='any params.yaml value by dotted key, as `dvc exp run -S`: {"split.horizon_days": 90}'),
        "force": Param(False, type="boolean", title="Force",
                       description="re-run every stage even if DVC finds it up to date"),
        "reason": Param("manual", type="string", title="Reason",
                        description="why this retrain runs (uservalue_monitor fills it in); tagged on the MLflow runs"),
    },
    tags=["uservalue", "dvc", "mlflow", "bentoml", "retrain"],
) as dag:

    # Waits without holding a worker slot: each poke is a short task try, rescheduled until it passes.
    @task.sensor(poke_interval=60, timeout=3600, mode="reschedule")
    def monitor_idle() -> bool:
        """No running uservalue_monitor run (it may still be re-ingesting data): stages never interleave."""
        running = active_runs(MONITOR_DAG_ID, ("running",))
        if running:
            print(f"{running} {MONITOR_DAG_ID} run(s) running: checking again in a minute")
        return running == 0

    @task(retries=0)
    def plan() -> list[str]:
        """Check the conf's overrides against params.yaml; the models to train (no retry: bad conf is final)."""
        import json

        context = get_current_context()
        params = context["params"]
        print(f"reason: {params.get('reason')}")
        output = run_uservalue(uservalue_command("plan", overrides=overrides_from_conf(params)), context)
        checked = json.loads(output)
        print(f"overrides: {checked['overrides']}; models: {checked['models']}")
        return checked["models"]

    def stage_task(stage: str, retries: int):
        @task(task_id=stage, pool=DVC_POOL, **retry_args(retries))
        def _run() -> None:
            run_stage(stage)

        return _run()

    @task(pool=DVC_POOL, map_index_template="{{ model_name }}", **retry_args(1))
    def train(model: str) -> None:
        """dvc repro --single-item train@<model> (one mapped task per model)."""
        get_current_context()["model_name"] = model  # shown as the map index in the UI
        run_stage(f"train@{model}")

    models = plan()
    monitor_idle() >> models
    # Retries reach transient failures only (exit 75, a killed stage): exit 1 or 2 fails at once, whatever the count.
    ingest = stage_task("ingest", retries=2)
    validate = stage_task("validate", retries=0)
    materialize = stage_task("materialize", retries=2)  # the online store the service scores ids from
    embed_items = stage_task("embed_items", retries=1)  # item text -> vectors (issue 23); featurize joins them
    featurize = stage_task("featurize", retries=1)
    trained = train.expand(model=models)
    evaluate = stage_task("evaluate", retries=1)
    register = stage_task("register", retries=2)
    train_recs = stage_task("train_recs", retries=1)  # the recommender (user-recs), packaged in the same Bento
    package = stage_task("package", retries=1)
    models >> ingest >> validate >> materialize >> embed_items >> featurize >> trained >> evaluate >> register >> train_recs >> package

"""Airflow DAG `uservalue_pipeline`: the DVC stages of dvc.yaml as Airflow tasks.

Each task runs `dvc repro --single-item <stage>` in the project directory, so Airflow shows and
retries stages one by one while DVC decides what is stale and keeps the lock file. DVC holds a
repository lock, so the tasks run strictly one after another (max_active_tasks=1 and a chain).

Nothing heavy happens at import: the scheduler parses this file often.
"""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param

# The stages of dvc.yaml, in order. `train` is a foreach stage (one `train@<model>` per entry of
# params train.models): one task runs them all via --glob, so the DAG needs no copy of that list.
STAGES: tuple[str, ...] = ("ingest", "validate", "featurize", "train", "evaluate", "register", "package", "monitor")
STAGE_TARGETS = {"train": "--glob 'train@*'"}
# Where the project (dvc.yaml) lives: set USERVALUE_PROJECT_DIR in the Airflow environment.
DEFAULT_PROJECT_DIR = os.environ.get("USERVALUE_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))

with DAG(
    dag_id="uservalue_pipeline",
    description="Ingest, validate (Great Expectations), featurize, train, evaluate, register, package (BentoML) and monitor (Evidently) with DVC",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    max_active_tasks=1,
    params={
        "project_dir": Param(DEFAULT_PROJECT_DIR, type="string", description="directory holding dvc.yaml"),
        "force": Param(False, type="boolean", description="re-run stages even if DVC finds them up to date"),
    },
    tags=["uservalue", "dvc"],
) as dag:
    previous = None
    for stage in STAGES:
        task = BashOperator(
            task_id=stage,
            cwd="{{ params.project_dir }}",
            bash_command=f"dvc repro --single-item {STAGE_TARGETS.get(stage, stage)}"
            + "{{ ' --force' if params.force else '' }}",
            env={"DVC_NO_ANALYTICS": "1"},
            append_env=True,
        )
        if previous is not None:
            previous >> task
        previous = task

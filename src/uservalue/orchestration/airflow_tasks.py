"""What the DAG files (dags/) share: where the project is, the DVC pool, and how a stage runs as a task.
Standard library only at import time (the scheduler imports this whenever it parses a DAG file);
see docs/orchestration.md."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from datetime import timedelta
from itertools import takewhile
from pathlib import Path
from typing import Any

from uservalue.errors import EXIT_TRANSIENT  # errors.py is standard library only

PROJECT_DIR_ENV = "USERVALUE_PROJECT_DIR"
PROJECT_DIR_VARIABLE = "uservalue_project_dir"
# Every task that runs DVC in the workspace takes the one slot of this pool (DVC's repository lock
# forbids two `dvc repro` at once in one workspace). `make airflow` creates it.
DVC_POOL = "uservalue_dvc"
_SIGNALS = 64  # Linux: 1..SIGRTMAX; a shell reports death by signal N as 128+N

# Run-conf fields of uservalue_retrain -> the params.yaml key each overrides.
CONF_OVERRIDES = {
    "data_source": "data.source",
    "data_path": "data.path",
    "eval_cutoff": "split.eval_cutoff",
    "models": "train.models",
}


def retry_args(retries: int) -> dict[str, Any]:
    """Retries with exponential backoff (30 s, 60 s, ... at most 10 min); 0 where a retry cannot help."""
    return {"retries": retries, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": retries > 0,
            "max_retry_delay": timedelta(minutes=10)}


def project_dir() -> Path:
    """USERVALUE_PROJECT_DIR, else the Airflow Variable uservalue_project_dir, else the DAG folder's parent.

    Called by tasks at run time only: a Variable lookup at parse time would hit the database.
    """
    configured = os.environ.get(PROJECT_DIR_ENV)
    if not configured:
        from airflow.sdk import Variable, get_current_context

        configured = Variable.get(PROJECT_DIR_VARIABLE, default=None)
        if not configured:  # the DAGs live in <project>/dags
            configured = str(Path(get_current_context()["dag"].fileloc).resolve().parents[1])
    return Path(configured).resolve()


def overrides_from_conf(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The run conf as dotted params overrides: the named fields, then the free-form `params` object."""
    overrides = {key: conf[field] for field, key in CONF_OVERRIDES.items() if conf.get(field) not in (None, "", [])}
    overrides.update(conf.get("params") or {})
    return overrides


def uservalue_command(*args: str, overrides: Mapping[str, Any] | None = None, force: bool = False) -> list[str]:
    """`python -m uservalue ...` with this worker's interpreter (Airflow and uservalue share it)."""
    command = [sys.executable, "-m", "uservalue", *args, "--project-dir", str(project_dir())]
    for key, value in (overrides or {}).items():
        command += ["--set", f"{key}={json.dumps(value)}"]  # JSON is YAML: `dvc exp run -S` semantics
    if force:
        command.append("--force")
    return command


def retryable(exit_code: int) -> bool:
    """Exit 75 (EX_TEMPFAIL: a store, lock or build subprocess failed) or death by a signal (-N or 128+N)."""
    return exit_code == EXIT_TRANSIENT or exit_code < 0 or 128 < exit_code <= 128 + _SIGNALS


def _describe(command: list[str]) -> str:
    """`stage ingest` for `python -m uservalue stage ingest --project-dir ...`; the command's start otherwise."""
    if command[1:3] != ["-m", "uservalue"]:
        return " ".join(command)[:80]
    return " ".join(takewhile(lambda word: not word.startswith("-"), command[3:]))


def run_uservalue(command: list[str], context: Mapping[str, Any]) -> str:
    """Run a uservalue command, its output in the task log; its last line.

    A transient failure (retryable()) raises AirflowException, left to the task's retries; any other
    non-zero exit (2 bad input, 1 validation failed, ...) raises AirflowFailException: final, no retry.
    """
    from airflow.providers.standard.hooks.subprocess import SubprocessHook
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    env = dict(os.environ)
    env.update({
        # Lineage: the MLflow runs a stage starts are tagged with the Airflow run that asked for them.
        "AIRFLOW_CTX_DAG_ID": context["dag"].dag_id,
        "AIRFLOW_CTX_DAG_RUN_ID": context["run_id"],
        "AIRFLOW_CTX_TASK_ID": context["task"].task_id,
        "USERVALUE_RUN_REASON": str(context["params"].get("reason") or ""),
        "DVC_NO_ANALYTICS": "1",
    })
    result = SubprocessHook().run_command(command, env=env, cwd=str(project_dir()))
    if result.exit_code == 0:
        return result.output
    failed = f"{_describe(command)} failed with exit code {result.exit_code}"
    if retryable(result.exit_code):
        raise AirflowException(f"{failed} (transient: the task's retries may help): {result.output}")
    raise AirflowFailException(f"{failed} (final: no retry): {result.output}")


def run_stage(stage: str, *, force_stage: bool = False) -> None:
    """The task body of one DVC stage: this run's conf overrides, `force` from the conf or the caller."""
    from airflow.sdk import get_current_context

    context = get_current_context()
    params = context["params"]
    force = force_stage or bool(params.get("force"))
    run_uservalue(uservalue_command("stage", stage, overrides=overrides_from_conf(params), force=force), context)


def active_runs(dag_id: str, states: tuple[str, ...] = ("queued", "running")) -> int:
    """How many runs of `dag_id` are in `states` (through the task SDK; no database access from tasks)."""
    from airflow.sdk import get_current_context

    return get_current_context()["ti"].get_dr_count(dag_id=dag_id, states=list(states))

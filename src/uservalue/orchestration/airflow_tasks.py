"""What the uservalue DAGs (dags/) share: where the project is, and how a DVC stage runs as a task.

The DAG files import this module while the scheduler parses them, which happens often: only the
standard library here at import time. Airflow is imported inside the functions tasks call, and
everything heavy (DVC, MLflow, the models) runs in a subprocess of the task.

A stage task runs `python -m uservalue stage <stage>` in the project: `dvc repro --single-item`
with the run conf's overrides written into params.yaml for that stage only (the original text is
put back afterwards). Exit code 2 means the stage rejected its input or configuration: the task
fails at once, without retries. Any other failure is left to the task's retries.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

PROJECT_DIR_ENV = "USERVALUE_PROJECT_DIR"
PROJECT_DIR_VARIABLE = "uservalue_project_dir"
# Every task that runs DVC in the workspace takes the one slot of this pool (DVC's repository lock
# forbids two `dvc repro` at once in one workspace). `make airflow` creates it.
DVC_POOL = "uservalue_dvc"
EXIT_BAD_INPUT = 2

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


def run_uservalue(command: list[str], context: Mapping[str, Any]) -> str:
    """Run a uservalue command, its output in the task log; its last line. Exit 2 fails without retry."""
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
    if result.exit_code == EXIT_BAD_INPUT:
        raise AirflowFailException(f"{command[3]} rejected its input or configuration (exit 2): {result.output}")
    if result.exit_code != 0:
        raise AirflowException(f"{' '.join(command[3:5])} failed with exit code {result.exit_code}: {result.output}")
    return result.output


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


def wait_while_running(dag_id: str, timeout_s: float = 3600, poll_s: float = 10) -> None:
    """Block until no run of `dag_id` is running: the two DAGs never interleave stages in one workspace.

    The pool keeps DVC commands one at a time; this keeps a monitor run from re-ingesting between a
    retrain's ingest and featurize (the monitor that triggered a retrain ends seconds later).
    """
    import time

    from airflow.sdk.exceptions import AirflowException

    deadline = time.monotonic() + timeout_s
    while (running := active_runs(dag_id, ("running",))) > 0:
        if time.monotonic() > deadline:
            raise AirflowException(f"{dag_id} still has {running} running run(s) after {timeout_s:.0f} s")
        print(f"waiting for {running} running {dag_id} run(s) to finish before touching the workspace", flush=True)
        time.sleep(poll_s)

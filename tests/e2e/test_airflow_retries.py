"""A real Airflow task run (`airflow dags test`, no server) of run_uservalue on commands that fail with a
given exit code the first time and succeed the next: a transient failure (75) or a killed process is
retried, bad input (2) and a failed validation (1) fail at once (slow: an Airflow database and a run).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.e2e.conftest import run_in, tool_env
from uservalue.orchestration.airflow_local import prepare

pytestmark = pytest.mark.slow

DAG_FILE = '''
import sys
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, get_current_context, task

from uservalue.orchestration.airflow_tasks import run_uservalue

# Fails the first time (exit code argv[1], or `kill`: SIGKILL), succeeds the next; a file counts the tries.
FAIL_ONCE = """
import os, pathlib, signal, sys
marker = pathlib.Path("tried-" + sys.argv[1])
if marker.exists():
    sys.exit(0)
marker.touch()
print("failing with", sys.argv[1], flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(sys.argv[1]))
"""

with DAG("exit_codes", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False):
    for outcome in ("75", "kill", "2", "1"):
        @task(task_id=f"exit_{outcome}", retries=1, retry_delay=timedelta(seconds=1))
        def _run(outcome=outcome) -> None:
            run_uservalue([sys.executable, "-c", FAIL_ONCE, outcome], get_current_context())

        _run()
'''


def test_transient_exits_are_retried_and_final_ones_are_not(tmp_path: Path) -> None:
    dags, home, workdir = tmp_path / "dags", tmp_path / "airflow_home", tmp_path / "work"
    for folder in (dags, workdir):
        folder.mkdir()
    (dags / "exit_codes.py").write_text(DAG_FILE)
    env = tool_env(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
                   AIRFLOW__CORE__LOAD_EXAMPLES="False", USERVALUE_PROJECT_DIR=str(workdir))
    prepare(env)
    done = run_in(workdir, "airflow", "dags", "test", "exit_codes", env=env, check=False, timeout=300)
    log = done.stdout + done.stderr
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute("SELECT task_id, state, try_number FROM task_instance WHERE dag_id = 'exit_codes'")
        tasks = {task_id: (state, tries) for task_id, state, tries in rows}
    assert tasks["exit_75"] == ("success", 2), (tasks, log[-3000:])  # EXIT_TRANSIENT: retried, then passed
    assert tasks["exit_kill"] == ("success", 2), (tasks, log[-3000:])  # killed by a signal: retried
    assert tasks["exit_2"] == ("failed", 1), (tasks, log[-3000:])  # bad input: final despite retries=1
    assert tasks["exit_1"] == ("failed", 1), (tasks, log[-3000:])  # validation failed: final
    assert sorted(path.name for path in workdir.iterdir()) == ["tried-1", "tried-2", "tried-75", "tried-kill"]
    assert "final: no retry" in log and "transient: the task's retries may help" in log, log[-3000:]

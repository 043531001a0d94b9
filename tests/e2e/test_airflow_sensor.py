"""uservalue_retrain's `monitor_idle` sensor, run by real Airflow (`airflow dags test`, no server; slow,
about a minute): while a uservalue_monitor run is running it is rescheduled (no worker slot held,
no try used), and it passes once that run has ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import run_in, tool_env
from uservalue.orchestration.airflow_local import prepare

pytestmark = pytest.mark.slow


def _query(db: Path, sql: str, *args: str) -> list[tuple]:
    with sqlite3.connect(db, timeout=30) as connection:
        return connection.execute(sql, args).fetchall()


def _wait_for_state(db: Path, state: str, process: subprocess.Popen, log: Path, timeout: float) -> tuple:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _query(db, "SELECT state, try_number FROM task_instance WHERE dag_id = 'uservalue_retrain' "
                          "AND task_id = 'monitor_idle'")
        if rows and rows[0][0] == state:
            return rows[0]
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"monitor_idle never {state}: {rows}\n{log.read_text()[-3000:]}")


def test_retrain_waits_for_a_running_monitor_rescheduled_not_sleeping(tmp_path: Path) -> None:
    home, workdir = tmp_path / "airflow_home", tmp_path / "work"
    workdir.mkdir()
    db = home / "airflow.db"
    env = tool_env(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(REPO_ROOT / "dags"),
                   AIRFLOW__CORE__LOAD_EXAMPLES="False", USERVALUE_PROJECT_DIR=str(workdir))
    prepare(env)
    run_in(workdir, "airflow", "dags", "reserialize", env=env)
    run_in(workdir, "airflow", "dags", "trigger", "uservalue_monitor", env=env)  # queued: no scheduler here
    _query(db, "UPDATE dag_run SET state = 'running' WHERE dag_id = 'uservalue_monitor'")  # as if one started

    log = tmp_path / "dags_test.log"
    with open(log, "w") as output:
        process = subprocess.Popen(["airflow", "dags", "test", "uservalue_retrain"], cwd=workdir, env=env,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert _wait_for_state(db, "up_for_reschedule", process, log, timeout=120)[1] == 1
        assert _query(db, "SELECT count(*) FROM task_reschedule")[0][0] >= 1
        _query(db, "UPDATE dag_run SET state = 'success' WHERE dag_id = 'uservalue_monitor'")
        # The next poke (poke_interval 60 s) sees no running monitor run; rescheduling used no retry.
        assert _wait_for_state(db, "success", process, log, timeout=150)[1] == 1
    finally:
        with contextlib.suppress(ProcessLookupError):  # plan and the stages would follow: not this test's subject
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)

"""uservalue_retrain's `monitor_idle` sensor, run by real Airflow (`airflow dags test`, no server; slow,
about half a minute): while a uservalue_monitor run is running it is rescheduled (no worker slot held,
no try used, the next poke a poke_interval later), and it passes once that run has ended. The test
brings that next poke forward in the metadata DB instead of waiting out the interval.
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
        # The reschedule request Airflow recorded: the next poke one poke_interval (60 s) after this one.
        [(wait,)] = _query(db, "SELECT (julianday(reschedule_date) - julianday(start_date)) * 86400 "
                               "FROM task_reschedule ORDER BY id DESC LIMIT 1")
        assert wait >= 59.9, wait
        _query(db, "UPDATE dag_run SET state = 'success' WHERE dag_id = 'uservalue_monitor'")
        # The minute's wait brought forward (as if the clock had moved on): `dags test` reads the reschedule
        # date from the metadata DB before each loop, so the next poke runs now, not a minute later.
        _query(db, "UPDATE task_reschedule SET reschedule_date = start_date")
        # The next poke sees no running monitor run; rescheduling used no retry.
        assert _wait_for_state(db, "success", process, log, timeout=150)[1] == 1
    finally:
        with contextlib.suppress(ProcessLookupError):  # plan and the stages would follow: not this test's subject
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)

"""A real `airflow standalone`, started the way `make airflow` starts it (`uservalue airflow`), driven
over its REST API as the UI would (slow): log in, unpause, trigger `uservalue_retrain` with a conf,
poll to success; a run on malformed data fails at validate, its log names the failed
expectations, and the champion and its Bento stay where they were; then the closed loop with the
real scheduler: new drifted events -> uservalue_monitor flags drift -> the uservalue_retrain run
it triggers goes through the registry's gate to a rebuilt Bento. The tests run in file order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pandas as pd
import pytest
import yaml

from tests.e2e.conftest import QUICK_RECS, free_port, set_param, tool_env, use_synthetic_data
from uservalue.orchestration.airflow_local import DVC_POOL

pytestmark = pytest.mark.slow
RETRAIN, MONITOR = "uservalue_retrain", "uservalue_monitor"


class Standalone:
    def __init__(self, project: Path) -> None:
        self.project = project
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = open(project.parent / f"airflow-{self.port}.log", "w")  # noqa: SIM115
        env = tool_env()
        for name in [n for n in env if n.startswith("AIRFLOW")]:  # only what `make airflow` sets...
            del env[name]
        # ...except the internal log servers' ports (8793/8794), which another Airflow here may hold.
        env.update(AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
                   AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()))
        self.process = subprocess.Popen(["uservalue", "airflow", "--port", str(self.port)], cwd=project, env=env,
                                        stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5)
                if health.status_code == 200 and health.json()["scheduler"]["status"] == "healthy":
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"airflow standalone not healthy:\n{self.log()}")
        password = json.loads((project / ".airflow/passwords.json").read_text())["admin"]
        token = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": password}, timeout=30)
        assert token.status_code == 201, token.text
        self.client = httpx.Client(base_url=f"{self.url}/api/v2", timeout=30,
                                   headers={"Authorization": f"Bearer {token.json()['access_token']}"})

    def log(self) -> str:
        return Path(self.output.name).read_text()[-5000:]

    def wait_for_dag(self, dag_id: str) -> None:
        deadline = time.monotonic() + 120
        while self.client.get(f"/dags/{dag_id}").status_code != 200:
            assert time.monotonic() < deadline, f"{dag_id} never parsed:\n{self.log()}"
            time.sleep(1)

    def trigger(self, dag_id: str, conf: dict) -> str:
        response = self.client.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        assert response.status_code == 200, response.text
        return response.json()["dag_run_id"]

    def wait(self, dag_id: str, run_id: str, timeout: float = 900) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.client.get(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}").json()["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(3)
        raise AssertionError(f"{dag_id} {run_id} still running after {timeout} s:\n{self.log()}")

    def runs(self, dag_id: str) -> list[dict]:
        return self.client.get(f"/dags/{dag_id}/dagRuns", params={"limit": 100}).json()["dag_runs"]

    def tasks(self, dag_id: str, run_id: str) -> dict[str, dict]:
        body = self.client.get(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances").json()
        return {ti["task_id"]: ti for ti in body["task_instances"]}

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        response = self.client.get(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
                                   f"/logs/{try_number}", headers={"Accept": "application/json"})
        assert response.status_code == 200, response.text
        return json.dumps(response.json()["content"])

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.client.close()
        self.output.close()


@pytest.fixture(scope="module")
def airflow(make_project) -> Iterator[Standalone]:
    project = make_project()
    use_synthetic_data(project, ["historical", "linear"], recs=QUICK_RECS)
    set_param(project, "monitor", "as_of", "1998-01-01")  # batch monitoring at the reference's cutoff
    server = Standalone(project)
    try:
        yield server
    finally:
        server.stop()


def test_standalone_is_local_with_a_generated_password_outside_git(airflow: Standalone) -> None:
    project = airflow.project
    assert (project / ".airflow/airflow.db").is_file()  # AIRFLOW_HOME in the project...
    ignored = subprocess.run(["git", "check-ignore", ".airflow/passwords.json"], cwd=project, capture_output=True,
                             text=True, check=False)
    assert ignored.returncode == 0  # ...and git never sees it
    assert oct((project / ".airflow/passwords.json").stat().st_mode & 0o777) == "0o600"
    assert airflow.client.get(f"/pools/{DVC_POOL}").json()["slots"] == 1
    assert airflow.client.get("/dags", params={"limit": 100}).json()["total_entries"] == 2  # no examples
    assert httpx.get(f"{airflow.url}/api/v2/dags", timeout=10).status_code in (401, 403)  # no token, no access


def test_rest_trigger_with_conf_runs_the_retrain_to_success(airflow: Standalone) -> None:
    project = airflow.project
    params_before = (project / "params.yaml").read_text()
    airflow.wait_for_dag(RETRAIN)
    unpaused = airflow.client.patch(f"/dags/{RETRAIN}", json={"is_paused": False})
    assert unpaused.status_code == 200 and unpaused.json()["is_paused"] is False
    run_id = airflow.trigger(RETRAIN, {"models": ["linear"], "reason": "first champion, via REST"})
    assert airflow.wait(RETRAIN, run_id) == "success", airflow.tasks(RETRAIN, run_id)
    states = {task_id: ti["state"] for task_id, ti in airflow.tasks(RETRAIN, run_id).items()}
    assert set(states.values()) == {"success"} and "package" in states, states
    package = json.loads((project / "reports/package.json").read_text())
    assert package["model_type"] == "linear"  # the conf's models, not params.yaml's two
    assert (project / "params.yaml").read_text() == params_before


def _export(project: Path, name: str, corrupt) -> None:
    """The validated events as a user's CSV export under data/raw/, corrupted by `corrupt`."""
    events = pd.read_parquet(project / "data/validated.parquet")
    events["ts"] = events["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    corrupt(events).to_csv(project / "data/raw" / name, index=False)


def _negative_amounts(events: pd.DataFrame) -> pd.DataFrame:
    events.loc[events.index[:40], "amount"] = -5.0
    return events


def _future_and_duplicated(events: pd.DataFrame) -> pd.DataFrame:
    events.loc[events.index[:40], "ts"] = "2031-01-01T00:00:00Z"
    return pd.concat([events, events.iloc[: len(events) // 20]])  # 5% duplicate rows


def test_unreadable_input_fails_at_ingest_at_once(airflow: Standalone) -> None:
    _export(airflow.project, "negative.csv", _negative_amounts)
    run_id = airflow.trigger(RETRAIN, {"data_source": "file", "data_path": "data/raw/negative.csv"})
    assert airflow.wait(RETRAIN, run_id) == "failed"
    ingest = airflow.tasks(RETRAIN, run_id)["ingest"]
    assert ingest["state"] == "failed" and ingest["try_number"] == 1  # bad input (exit 2): no retry, though allowed
    log = airflow.task_log(RETRAIN, run_id, "ingest", 1)
    assert "data/raw/negative.csv, row 2, column 'amount'" in log


def test_malformed_data_fails_at_validate_and_leaves_the_champion_and_bento(airflow: Standalone) -> None:
    project = airflow.project
    package_before = (project / "reports/package.json").read_text()
    registry_before = (project / "reports/registry.json").read_text()
    _export(project, "malformed.csv", _future_and_duplicated)
    run_id = airflow.trigger(RETRAIN, {"data_source": "file", "data_path": "data/raw/malformed.csv",
                                       "reason": "new export from the warehouse"})
    assert airflow.wait(RETRAIN, run_id) == "failed"
    tasks = airflow.tasks(RETRAIN, run_id)
    assert tasks["ingest"]["state"] == "success"
    assert tasks["validate"]["state"] == "failed" and tasks["validate"]["try_number"] == 1  # final: no retry
    assert {tasks[t]["state"] for t in ("featurize", "evaluate", "register", "package")} == {"upstream_failed"}
    log = airflow.task_log(RETRAIN, run_id, "validate", 1)
    for named in ("expect_column_values_to_be_between", "expect_compound_columns_to_be_unique",
                  "reports/validation/data_docs/index.html"):
        assert named in log, named
    assert (project / "reports/package.json").read_text() == package_before
    assert (project / "reports/registry.json").read_text() == registry_before
    bento = json.loads(package_before)["bento"]
    assert (project / ".bentoml/bentos" / bento.replace(":", "/")).is_dir()


def test_closed_loop_drift_triggers_a_retrain_that_the_scheduler_runs(airflow: Standalone) -> None:
    project = airflow.project
    old = json.loads((project / "reports/package.json").read_text())
    synthetic = yaml.safe_load((project / "params.yaml").read_text())["data"]["synthetic"]
    set_param(project, "data", "synthetic", {**synthetic, "drift": 1.0})  # the world new events come from
    airflow.wait_for_dag(MONITOR)
    retrains_before = {run["dag_run_id"] for run in airflow.runs(RETRAIN)}
    # Unpaused, the daily schedule (catchup off) starts the run of the latest interval at once.
    assert airflow.client.patch(f"/dags/{MONITOR}", json={"is_paused": False}).status_code == 200
    deadline = time.monotonic() + 120
    while not (runs := airflow.runs(MONITOR)):
        assert time.monotonic() < deadline, f"no scheduled monitor run:\n{airflow.log()}"
        time.sleep(2)
    monitor_run = runs[0]["dag_run_id"]
    assert runs[0]["run_type"] == "scheduled"
    assert airflow.wait(MONITOR, monitor_run) == "success", airflow.tasks(MONITOR, monitor_run)
    assert airflow.tasks(MONITOR, monitor_run)["trigger_retrain"]["state"] == "success"
    triggered = [run for run in airflow.runs(RETRAIN) if run["dag_run_id"] not in retrains_before]
    assert len(triggered) == 1 and triggered[0]["run_type"] == "operator_triggered"
    assert triggered[0]["conf"]["reason"].startswith(f"drift detected by uservalue_monitor run {monitor_run}")
    assert airflow.wait(RETRAIN, triggered[0]["dag_run_id"]) == "success"
    registry = json.loads((project / "reports/registry.json").read_text())
    new = json.loads((project / "reports/package.json").read_text())
    assert new["bento"] != old["bento"] and (project / ".bentoml/bentos" / new["bento"].replace(":", "/")).is_dir()
    expected = registry["candidate"]["version"] if registry["decision"]["promote"] else old["model_version"]
    assert new["model_version"] == expected, registry["decision"]

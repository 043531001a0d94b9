"""Both DAGs run for real with `airflow dags test` (no server; slow): retrain end to end, the monitor
on undrifted and on drifted data, and the retrain the monitor asks for, through the registry's gate
to a rebuilt Bento. The tests share one project and run in file order, as a user's days would.

Run states are read from Airflow's own metadata database (SQLite in AIRFLOW_HOME).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.e2e.conftest import QUICK_RECS, run_in, set_param, tool_env, use_synthetic_data
from uservalue.orchestration.airflow_local import prepare

pytestmark = pytest.mark.slow
RETRAIN, MONITOR = "uservalue_retrain", "uservalue_monitor"


class Airflow:
    def __init__(self, project: Path, home: Path) -> None:
        self.project, self.home = project, home
        self.env = tool_env(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(project / "dags"),
                            AIRFLOW__CORE__LOAD_EXAMPLES="False", USERVALUE_PROJECT_DIR=str(project))
        prepare(self.env)  # what `make airflow` does first: migrate the metadata DB, create the DVC pool

    def dags_test(self, dag_id: str, conf: dict | None = None, check: bool = True) -> str:
        args = ["airflow", "dags", "test", dag_id] + (["-c", json.dumps(conf)] if conf is not None else [])
        done = run_in(self.project, *args, env=self.env, check=check, timeout=900)
        return done.stdout + done.stderr

    def runs(self, dag_id: str) -> list[dict]:
        with sqlite3.connect(self.home / "airflow.db") as db:
            rows = db.execute("SELECT run_id, state, run_type, conf FROM dag_run WHERE dag_id = ? ORDER BY id",
                              (dag_id,)).fetchall()
        return [{"run_id": r[0], "state": r[1], "run_type": r[2], "conf": json.loads(r[3] or "{}")} for r in rows]

    def tasks(self, run_id: str) -> dict[tuple[str, int], tuple[str, int]]:
        with sqlite3.connect(self.home / "airflow.db") as db:
            rows = db.execute("SELECT task_id, map_index, state, try_number FROM task_instance WHERE run_id = ?",
                              (run_id,)).fetchall()
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}


@pytest.fixture(scope="module")
def airflow(make_project, tmp_path_factory: pytest.TempPathFactory) -> Airflow:
    project = make_project()
    use_synthetic_data(project, ["linear"], recs=QUICK_RECS)
    # Batch monitoring at the reference's cutoff: an undrifted world then looks like the reference.
    set_param(project, "monitor", "as_of", "1998-01-01")
    return Airflow(project, tmp_path_factory.mktemp("airflow_home"))


def _champion(project: Path) -> dict:
    return json.loads((project / "reports/package.json").read_text())


def test_retrain_runs_every_stage_and_ends_with_a_registered_champion(airflow: Airflow) -> None:
    project = airflow.project
    params_before = (project / "params.yaml").read_text()
    log = airflow.dags_test(RETRAIN, {"models": ["historical"], "reason": "first champion"})
    run = airflow.runs(RETRAIN)[-1]
    assert run["state"] == "success", log[-3000:]
    tasks = airflow.tasks(run["run_id"])
    for task_id in ("plan", "ingest", "validate", "materialize", "featurize", "evaluate", "register", "package"):
        assert tasks[(task_id, -1)][0] == "success", (task_id, tasks)
    assert tasks[("train", 0)][0] == "success" and ("train", 1) not in tasks  # one mapped task per model
    # The conf reached DVC as an override; the workspace's params.yaml is as it was.
    assert (project / "params.yaml").read_text() == params_before
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert "train@historical" in lock["stages"]
    assert lock["stages"]["evaluate"]["params"]["params.yaml"]["train.models"] == ["historical"]
    registry = json.loads((project / "reports/registry.json").read_text())
    assert registry["decision"]["alias"] == "champion"
    package = _champion(project)
    assert package["model_type"] == "historical" and package["model_version"] == registry["candidate"]["version"]
    assert (project / ".bentoml/bentos" / package["bento"].replace(":", "/")).is_dir()
    # The MLflow runs say which Airflow run asked for them, and why.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    train_run = client.get_run(registry["candidate"]["run_id"])
    assert train_run.data.tags["airflow.dag_run_id"] == run["run_id"]
    assert train_run.data.tags["reason"] == "first champion"


def test_monitor_without_drift_ends_without_a_retrain(airflow: Airflow) -> None:
    before = len(airflow.runs(RETRAIN))
    log = airflow.dags_test(MONITOR)
    run = airflow.runs(MONITOR)[-1]
    tasks = airflow.tasks(run["run_id"])
    assert run["state"] == "success", log[-3000:]
    assert tasks[("monitor", -1)][0] == "success" and tasks[("no_drift", -1)][0] == "success"
    assert tasks[("trigger_retrain", -1)][0] == "skipped"
    assert json.loads((airflow.project / "reports/monitoring/latest.json").read_text())["drift_detected"] is False
    assert len(airflow.runs(RETRAIN)) == before


def test_drift_triggers_a_retrain_that_goes_through_the_gate_to_a_rebuilt_bento(airflow: Airflow) -> None:
    project = airflow.project
    old = _champion(project)
    set_param(project, "data", "synthetic", {**yaml.safe_load((project / "params.yaml").read_text())["data"]
                                             ["synthetic"], "drift": 1.0})  # the world the new events come from
    log = airflow.dags_test(MONITOR)
    run = airflow.runs(MONITOR)[-1]
    assert run["state"] == "success", log[-3000:]
    assert airflow.tasks(run["run_id"])[("trigger_retrain", -1)][0] == "success"
    verdict = json.loads((project / "reports/monitoring/latest.json").read_text())
    assert verdict["drift_detected"] is True
    triggered = airflow.runs(RETRAIN)[-1]
    assert triggered["run_type"] == "operator_triggered" and triggered["state"] == "queued"
    reason = triggered["conf"]["reason"]
    assert reason.startswith(f"drift detected by uservalue_monitor run {run['run_id']}")
    assert all(column in reason for column in verdict["drifted_columns"])

    # `dags test` only queues the triggered run (a scheduler would start it): run it with its conf.
    log = airflow.dags_test(RETRAIN, triggered["conf"])
    assert airflow.runs(RETRAIN)[-1]["state"] == "success", log[-3000:]
    registry = json.loads((project / "reports/registry.json").read_text())
    new = _champion(project)
    assert new["bento"] != old["bento"]  # the Bento was rebuilt...
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    champion = str(client.get_model_version_by_alias(new["model_name"], "champion").version)
    assert new["model_version"] == champion  # ...around whatever the gate left as champion
    if registry["decision"]["promote"]:
        assert champion == registry["candidate"]["version"] != old["model_version"]
    else:
        assert champion == old["model_version"], registry["decision"]
    assert registry["decision"]["promote"], registry["decision"]  # here: linear on the new world beats historical
    assert client.get_run(registry["candidate"]["run_id"]).data.tags["reason"] == reason

"""The Airflow DAG runs the real DVC stages (`airflow dags test`, no server needed; slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.e2e.conftest import run_in, set_param, tool_env

pytestmark = pytest.mark.slow
DAG_ID = "uservalue_pipeline"


@pytest.fixture(scope="module")
def airflow(make_project, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    project = make_project()
    set_param(project, "train", "models", ["historical", "linear"])  # the DAG follows params: quick here
    env = tool_env(
        AIRFLOW_HOME=str(tmp_path_factory.mktemp("airflow_home")),
        AIRFLOW__CORE__DAGS_FOLDER=str(project / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        USERVALUE_PROJECT_DIR=str(project),
    )
    run_in(project, "airflow", "db", "migrate", env=env)
    return project, env


def test_dag_runs_every_stage_through_dvc(airflow) -> None:
    project, env = airflow
    done = run_in(project, "airflow", "dags", "test", DAG_ID, env=env)
    log = done.stdout + done.stderr
    for stage in ("ingest", "validate", "featurize", "train", "evaluate", "register", "package", "monitor"):
        assert f"task_id='{stage}'" in log
    assert "state=success" in log
    assert len(pd.read_parquet(project / "data/features/eval.parquet")) == 23_570
    assert json.loads((project / "reports/registry.json").read_text())["decision"]["alias"] == "champion"
    assert json.loads((project / "reports/package.json").read_text())["bento"].startswith("uservalue:")
    assert "drift_detected" in json.loads((project / "reports/monitoring/latest.json").read_text())
    assert "up to date" in run_in(project, "dvc", "status").stdout  # Airflow ran DVC, DVC kept its lock


def test_failed_gate_fails_the_run_and_stops_downstream(airflow) -> None:
    project, env = airflow
    features = project / "data/features/eval.parquet"
    before = features.read_bytes()
    original = set_param(project, "validate", "min_users", 100_000_000)
    try:
        done = run_in(project, "airflow", "dags", "test", DAG_ID, env=env, check=False)
    finally:
        (project / "params.yaml").write_text(original)
    log = done.stdout + done.stderr
    assert "state=failed" in log or done.returncode != 0
    assert "validate.min_users" in log  # the gate's message reaches the Airflow task log
    assert features.read_bytes() == before  # featurize did not run; last good features kept
    assert json.loads((project / "reports/validation/summary.json").read_text())["success"] is False

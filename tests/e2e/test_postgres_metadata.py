"""Airflow's metadata database and MLflow's backend store on PostgreSQL, by configuration alone
(AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, MLFLOW_TRACKING_URI): a throwaway PostgreSQL 15 cluster, the
retrain DAG run for real with `airflow dags test`, the champion registered and packaged, and the
registry read back the same by a second client (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import sqlalchemy

from tests.e2e.conftest import QUICK_RECS, run_in, tool_env, use_synthetic_data
from tests.support.postgres import postgres_cluster
from uservalue.orchestration.airflow_local import prepare

pytestmark = pytest.mark.slow


def test_retrain_dag_with_airflow_and_mlflow_on_postgresql(make_project, tmp_path: Path) -> None:
    with postgres_cluster(tmp_path / "pg") as cluster:
        airflow_db = cluster.create_database("airflow")
        mlflow_db = cluster.create_database("mlflow")
        project = make_project()
        use_synthetic_data(project, ["historical"], recs=QUICK_RECS)
        env = tool_env(AIRFLOW_HOME=str(tmp_path / "airflow_home"), AIRFLOW__CORE__DAGS_FOLDER=str(project / "dags"),
                       AIRFLOW__CORE__LOAD_EXAMPLES="False", USERVALUE_PROJECT_DIR=str(project),
                       AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=airflow_db, MLFLOW_TRACKING_URI=mlflow_db)
        prepare(env)  # `airflow db migrate` on PostgreSQL, and the DVC pool

        done = run_in(project, "airflow", "dags", "test", "uservalue_retrain", "-c",
                      json.dumps({"models": ["historical"], "reason": "postgres"}), env=env, check=False, timeout=900)
        log = done.stdout + done.stderr

        engine = sqlalchemy.create_engine(airflow_db)
        with engine.connect() as conn:
            run_id, state = conn.execute(sqlalchemy.text(
                "SELECT run_id, state FROM dag_run WHERE dag_id = 'uservalue_retrain' ORDER BY id DESC LIMIT 1")).one()
            tasks = dict(conn.execute(sqlalchemy.text(
                "SELECT task_id, state FROM task_instance WHERE run_id = :run AND map_index = -1"), {"run": run_id}).all())
        engine.dispose()
        assert state == "success", log[-4000:]
        assert tasks["register"] == "success" and tasks["package"] == "success", tasks

        registry = json.loads((project / "reports/registry.json").read_text())
        package = json.loads((project / "reports/package.json").read_text())
        assert registry["decision"]["alias"] == "champion"
        assert package["model_version"] == registry["candidate"]["version"]
        assert not (project / "mlflow.db").exists()  # nothing fell back to the embedded SQLite store

        # A second client, in this process, reads the same registry from PostgreSQL.
        client = mlflow.MlflowClient(tracking_uri=mlflow_db)
        champion = client.get_model_version_by_alias("user-value", "champion")
        assert str(champion.version) == str(registry["candidate"]["version"])
        assert champion.run_id == registry["candidate"]["run_id"] == package["run_id"]
        assert client.get_run(champion.run_id).data.tags["airflow.dag_run_id"] == run_id

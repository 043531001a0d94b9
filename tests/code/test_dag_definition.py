"""The DAG file parses in a real Airflow DagBag and wires one task per DVC stage, in order."""

from __future__ import annotations

import yaml

from tests.conftest import REPO_ROOT


def test_dag_has_one_task_per_dvc_stage_in_order(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["uservalue_pipeline"]
    stages = list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])
    assert [t.task_id for t in dag.topological_sort()] == stages
    for upstream, downstream in zip(stages, stages[1:], strict=False):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    assert dag.max_active_tasks == 1  # DVC's repository lock: never two stages at once
    assert "dvc repro --single-item validate" in dag.get_task("validate").bash_command
    assert "dvc repro --single-item --glob 'train@*'" in dag.get_task("train").bash_command

"""The DAG files parse in a real Airflow DagBag, without heavy imports, with the tasks, order, pool,
sensor and retries the orchestration promises (issue 5). Running them is tests/e2e/test_airflow_dags.py."""

from __future__ import annotations

from itertools import pairwise

import pytest
import yaml

from bench.dag_parse import HEAVY, parse_fresh
from tests.conftest import REPO_ROOT
from uservalue.orchestration.airflow_tasks import DVC_POOL

RETRAIN_STAGES = ["ingest", "validate", "materialize", "embed_items", "featurize", "train", "evaluate", "register",
                  "train_recs", "package"]
RETRAIN_ORDER = ["monitor_idle", "plan", *RETRAIN_STAGES]


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    mp.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
    mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    mp.delenv("USERVALUE_MONITOR_SCHEDULE", raising=False)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    yield bag
    mp.undo()


def test_every_dag_file_imports_and_parses_fast(dagbag) -> None:
    assert not dagbag.import_errors, dagbag.import_errors
    assert set(dagbag.dags) == {"uservalue_retrain", "uservalue_monitor"}
    for stat in dagbag.dagbag_stats:  # the figure is reported (bench/dag_parse.py); no timed assertion
        print(f"parse {stat.file}: {stat.duration.total_seconds() * 1000:.0f} ms, {stat.task_num} tasks")
    assert {stat.file for stat in dagbag.dagbag_stats} == {"uservalue_retrain.py", "uservalue_monitor.py"}


@pytest.mark.parametrize("dag_file", sorted((REPO_ROOT / "dags").glob("*.py")), ids=lambda path: path.name)
def test_parsing_a_dag_file_imports_nothing_heavy(dag_file, tmp_path) -> None:
    report = parse_fresh(dag_file, tmp_path)  # a fresh interpreter, as the DAG processor parses each file
    assert report["dags"] == [dag_file.stem]
    assert {"torch", "mlflow", "duckdb", "bentoml", "evidently", "great_expectations", "dvc", "pandas"} <= set(HEAVY)
    assert report["heavy"] == [], report["heavy"]  # none of HEAVY is loaded
    assert set(report["uservalue"]) <= {"uservalue", "uservalue.errors", "uservalue.orchestration",
                                        "uservalue.orchestration.airflow_tasks"}, report["uservalue"]


def test_retrain_has_one_task_per_dvc_stage_in_pipeline_order(dagbag) -> None:
    dag = dagbag.dags["uservalue_retrain"]
    assert [t.task_id for t in dag.topological_sort()] == RETRAIN_ORDER
    for upstream, downstream in pairwise(RETRAIN_ORDER):
        assert upstream in dag.get_task(downstream).upstream_task_ids
    # Every DVC stage of dvc.yaml up to package has its task (monitor is the other DAG's).
    stages = list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])
    assert stages[: stages.index("package") + 1] == RETRAIN_STAGES
    # train is mapped: one task instance per model, resolved by `plan` at run time.
    assert dag.get_task("train").upstream_task_ids == {"plan", "featurize"}
    assert "MappedOperator" in {cls.__name__ for cls in type(dag.get_task("train")).__mro__}


def test_workspace_tasks_share_the_one_slot_pool_and_retry_only_where_it_helps(dagbag) -> None:
    retrain, monitor = dagbag.dags["uservalue_retrain"], dagbag.dags["uservalue_monitor"]
    for dag, dvc_tasks in ((retrain, RETRAIN_STAGES), (monitor, ["ingest", "validate", "monitor"])):
        for task_id in dvc_tasks:
            assert dag.get_task(task_id).pool == DVC_POOL, (dag.dag_id, task_id)
    assert retrain.get_task("plan").pool != DVC_POOL  # reads params only
    assert retrain.get_task("monitor_idle").pool != DVC_POOL
    for dag in (retrain, monitor):
        assert dag.get_task("validate").retries == 0  # a validation failure is final
        assert dag.get_task("ingest").retries >= 1 and dag.get_task("ingest").retry_exponential_backoff
    assert retrain.get_task("register").retries >= 1
    assert retrain.max_active_runs == 1 and monitor.max_active_runs == 1


def test_retrain_waits_for_a_running_monitor_without_holding_a_worker_slot(dagbag) -> None:
    sensor = dagbag.dags["uservalue_retrain"].get_task("monitor_idle")
    assert sensor.mode == "reschedule"  # between pokes the task is up_for_reschedule, not sleeping in a worker
    assert sensor.poke_interval >= 60 and sensor.timeout == 3600
    assert sensor.downstream_task_ids == {"plan"} and not sensor.upstream_task_ids


def test_retrain_conf_form_has_described_params(dagbag) -> None:
    dag = dagbag.dags["uservalue_retrain"]
    params = dag.params
    for name in ("data_source", "data_path", "eval_cutoff", "models", "params", "force", "reason"):
        assert params.get_param(name).description, name
    assert params["force"] is False and params["models"] is None
    assert dag.timetable.can_be_scheduled is False  # triggered only: UI, REST, uservalue_monitor
    assert "uservalue" in dag.tags and "Trigger DAG w/ config" in dag.doc_md


def test_monitor_branches_on_the_verdict_and_triggers_retrain(dagbag) -> None:
    dag = dagbag.dags["uservalue_monitor"]
    order = ["retrain_idle", "ingest", "validate", "monitor", "check_drift"]
    assert [t.task_id for t in dag.topological_sort()][:5] == order
    for upstream, downstream in pairwise(order):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    assert dag.get_task("check_drift").downstream_task_ids == {"trigger_retrain", "no_drift"}
    trigger = dag.get_task("trigger_retrain")
    assert trigger.trigger_dag_id == "uservalue_retrain" and "reason" in trigger.conf
    assert dag.get_task("monitor").trigger_rule == "none_failed"  # runs when refresh_data skips ingest
    assert dag.timetable.expression == "0 0 * * *"  # @daily unless USERVALUE_MONITOR_SCHEDULE says otherwise
    assert "monitoring" in dag.tags and dag.doc_md

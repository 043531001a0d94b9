"""MLflow wiring: where runs go, what every run records about its code and data (lineage), and how
a ValueModel is logged as an MLflow pyfunc. Nothing connects at import time."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException

from uservalue.config import TrackingParams
from uservalue.models.model_input import predict_with_influence, to_model_input

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def tracking_uri(params: TrackingParams, project_dir: Path) -> str:
    """MLFLOW_TRACKING_URI, else params, else SQLite in the project (the file store is deprecated)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if params.uri:
        return params.uri
    return f"sqlite:///{(project_dir / DEFAULT_DB).resolve()}"


def configure(params: TrackingParams, project_dir: str | Path = ".") -> str:
    """Point MLflow at the tracking store and make sure the experiment exists; its id."""
    project_dir = Path(project_dir)
    mlflow.set_tracking_uri(tracking_uri(params, project_dir))
    experiment = mlflow.get_experiment_by_name(params.experiment)
    if experiment is None:
        location = params.artifact_location or (project_dir / DEFAULT_ARTIFACTS).resolve().as_uri()
        experiment_id = mlflow.create_experiment(params.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# MLflow error codes of a store that is down or overloaded (not of a bad request).
_TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED",
                              "DEADLINE_EXCEEDED", "ENDPOINT_NOT_FOUND"})


def is_store_failure(error: BaseException) -> bool:
    """True for a tracking/registry store that cannot be reached or written right now (the CLI exits
    EXIT_TRANSIENT for it, so orchestrators retry)."""
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    if isinstance(error, (requests.exceptions.RequestException, sqlalchemy.exc.OperationalError, OSError)):
        return True
    if isinstance(error, MlflowException):
        cause = error.__cause__ or error.__context__
        return error.error_code in _TRANSIENT_CODES or "API request to" in str(error) or (
            cause is not None and is_store_failure(cause))
    return False


# Set by the Airflow task that runs a stage (uservalue.orchestration.airflow_tasks): which run asked for it, and why.
RUN_CONTEXT_ENV = {
    "AIRFLOW_CTX_DAG_ID": "airflow.dag_id",
    "AIRFLOW_CTX_DAG_RUN_ID": "airflow.dag_run_id",
    "AIRFLOW_CTX_TASK_ID": "airflow.task_id",
    "USERVALUE_RUN_REASON": "reason",
}


def run_context_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow tags naming the orchestrator run behind a stage (none when run by hand)."""
    environ = os.environ if environ is None else environ
    return {tag: environ[var][:5000] for var, tag in RUN_CONTEXT_ENV.items() if environ.get(var)}


def dvc_output_hashes(project_dir: str | Path, stage: str) -> dict[str, str]:
    """The hashes DVC recorded for a stage's outputs (dvc.lock), e.g. the features a model saw."""
    lock = Path(project_dir) / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {out["path"]: out.get("md5", "") for out in stages.get(stage, {}).get("outs", [])}


# MLflow's own tag for the code version (the UI shows it with the run's source).
GIT_COMMIT_TAG = "mlflow.source.git.commit"


def lineage_tags(root: Path, upstream_stage: str) -> dict[str, str]:
    """What a run was made from: the project's git commit, the DVC hashes of the upstream stage's
    outputs, and the orchestrator run that asked for it."""
    from mlflow.utils.git_utils import get_git_commit

    commit = get_git_commit(str(root))
    return {
        **({GIT_COMMIT_TAG: commit} if commit else {}),
        **{f"dvc.{path}": md5 for path, md5 in dvc_output_hashes(root, upstream_stage).items()},
        **run_context_tags(),
    }


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"prefix.a.b": 1}: nested params as MLflow params."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: value}


class UserValuePyfunc(mlflow.pyfunc.PythonModel):
    """Any ValueModel as an MLflow pyfunc: features in, predictions and influence out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from uservalue.models.catalog import load_model

        self.model = load_model(context.artifacts["model"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return predict_with_influence(self.model, model_input)


PIP_REQUIREMENTS_PACKAGES = ("mlflow", "pandas", "numpy", "scikit-learn", "lightgbm", "torch", "pymc-marketing")


def pip_requirements() -> list[str]:
    """Pinned to what is installed; inference would cost ~10 s per model."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in PIP_REQUIREMENTS_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


def log_value_model(model_dir: Path, features: pd.DataFrame, model: Any, name: str = "model") -> Any:
    """Log a saved ValueModel with signature and an input example; the ModelInfo."""
    from mlflow.models import infer_signature

    example = to_model_input(features.head(5))
    signature = infer_signature(example, predict_with_influence(model, features.head(5)))
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("mlflow_pyfunc.py")),  # model from code, no pickle
        artifacts={"model": str(model_dir)},
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
    )


# Who runs a run: a run still RUNNING whose process is gone was killed (kill -9, OOM, a lost machine).
PID_TAG = "uservalue.pid"
HOST_TAG = "uservalue.host"


def process_tags() -> dict[str, str]:
    """Tags naming the process that runs a run (see fail_orphan_runs)."""
    import socket

    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fail_orphan_runs(experiment_id: str) -> list[str]:
    """Mark FAILED every RUNNING run of the experiment that this host started (process_tags) in a process
    that no longer exists, so a killed stage does not leave its run RUNNING forever; the run ids.
    Runs of other hosts, and runs without the tags, are left alone: their process cannot be checked."""
    import socket

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    orphans = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "uservalue.orphaned", f"process {pid} on {host} gone; marked FAILED")
        client.set_terminated(run.info.run_id, status="FAILED")
        orphans.append(run.info.run_id)
    return orphans


# Registry helpers shared by the value model's register stage and the recommender's train_recs.
def current_alias(client: mlflow.MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_for_run(client: mlflow.MlflowClient, name: str, run_id: str, model_uri: str) -> Any:
    """The registry version of this run: re-running register (or train_recs) for the same run reuses it."""
    try:
        existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        existing = []
    if existing:
        return max(existing, key=lambda v: int(v.version))
    return mlflow.register_model(model_uri, name)

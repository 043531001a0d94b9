"""The package stage: the registered champion into the BentoML model store, then `bentoml build`.

`bentoml.mlflow.import_model` copies `models:/<name>@champion` into the store with the MLflow
version, run id, training data hash and metrics as labels and metadata (a re-run for the same
registry version reuses that model); `bentoml build` (offline: `lock_packages: false`) then
builds bentofile.yaml with the exact model tag as a Bento argument, so the Bento serves that
model and no other. The result is recorded in reports/package.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from uservalue.config import Params
from uservalue.errors import ConfigError, InputError, UservalueError
from uservalue.io import write_json
from uservalue.lifecycle.metrics import VALUE_METRIC_KEYS

BENTOML_DIR = ".bentoml"
WHEEL_DIR = Path("dist")


def bentoml_home(params: Params, project_dir: str | Path) -> Path:
    """BENTOML_HOME, else params package.bentoml_home, else .bentoml in the project."""
    configured = os.environ.get("BENTOML_HOME") or params.package.bentoml_home
    home = Path(configured) if configured else Path(project_dir) / BENTOML_DIR
    return home if home.is_absolute() else (Path(project_dir) / home).resolve()


def bentoml_env(params: Params, project_dir: str | Path) -> dict[str, str]:
    from uservalue.lifecycle.tracking import tracking_uri

    return {**os.environ, "BENTOML_HOME": str(bentoml_home(params, project_dir)), "BENTOML_DO_NOT_TRACK": "true",
            "MLFLOW_TRACKING_URI": tracking_uri(params.tracking, Path(project_dir))}


def value_model_dir(bento_model_path: str | Path) -> Path:
    """Where the saved ValueModel sits inside an imported MLflow model (the pyfunc's artifact)."""
    return Path(bento_model_path) / "mlflow_model" / "artifacts" / "model"


def load_packaged_model(bento_model: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(ValueModel, ModelInfo, metadata record) of a model in the BentoML store.

    The service loads the ValueModel directly rather than through the MLflow pyfunc: the pyfunc's
    schema enforcement of list columns costs milliseconds a request for the same numbers.
    """
    from uservalue.models import load_model
    from uservalue.models.base import ModelInfo

    labels = dict(bento_model.info.labels)
    metadata = dict(bento_model.info.metadata)
    model = load_model(value_model_dir(bento_model.path))
    info = ModelInfo(name=labels.get("mlflow_model_name", str(bento_model.tag.name)),
                     version=labels.get("mlflow_version", str(bento_model.tag.version)),
                     run_id=labels.get("mlflow_run_id", ""), model_type=labels.get("model_type", ""))
    record = {
        "model_name": info.name,
        "model_version": info.version,
        "model_type": info.model_type,
        "run_id": info.run_id,
        "bento_model": str(bento_model.tag),
        "horizon_days": int(model.horizon_days),
        "behaviors": list(model.spec.behaviors),
        **metadata,
    }
    return model, info, record


def _champion(params: Params, project_dir: Path) -> tuple[Any, Any]:
    import mlflow

    from uservalue.lifecycle.registry import registered_version

    version = registered_version(params, project_dir, params.package.model_alias)
    return version, mlflow.MlflowClient().get_run(version.run_id)


def _import_model(version: Any, run: Any, params: Params) -> Any:
    import bentoml

    name = params.register_.model_name
    labels = {"mlflow_model_name": name, "mlflow_version": str(version.version), "mlflow_run_id": version.run_id,
              "model_type": run.data.tags.get("model", "")}
    try:
        stored = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        stored = []
    for existing in stored:
        if all(existing.info.labels.get(k) == v for k, v in labels.items()):
            return existing
    metadata = {
        "registered_as": params.package.model_alias,
        "metrics": {k: float(version.tags[f"eval_{k}"]) for k in VALUE_METRIC_KEYS if f"eval_{k}" in version.tags},
        "eval_cutoff": version.tags.get("eval_cutoff", ""),
        "training_data": {k.removeprefix("dvc."): v for k, v in run.data.tags.items() if k.startswith("dvc.")},
        "features_md5": version.tags.get("features_md5", ""),
        "git_commit": run.data.tags.get("git_commit", ""),
    }
    return bentoml.mlflow.import_model(name, model_uri=f"models:/{name}/{version.version}", labels=labels,
                                       metadata=metadata)


def build_wheel(project_dir: Path) -> Path:
    """The uservalue wheel the Bento installs (built offline from this checkout)."""
    out = project_dir / WHEEL_DIR
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(out), str(project_dir)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UservalueError(f"building the uservalue wheel failed:\n{done.stderr.strip()}")
    wheels = sorted(out.glob("uservalue-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1]


def run_package(params: Params, project_dir: str | Path, bentofile: str | Path, out_path: str | Path) -> dict[str, Any]:
    project_dir = Path(project_dir).resolve()
    bentofile = Path(bentofile)
    if not bentofile.is_file():
        raise InputError(bentofile, "bentofile does not exist", expected="the project's bentofile.yaml")
    env = bentoml_env(params, project_dir)
    os.environ.update({k: env[k] for k in ("BENTOML_HOME", "BENTOML_DO_NOT_TRACK")})  # before bentoml is imported
    version, run = _champion(params, project_dir)
    model = _import_model(version, run, params)
    build_wheel(project_dir)
    labels = {"mlflow_model_name": params.register_.model_name, "mlflow_version": str(version.version),
              "mlflow_run_id": version.run_id}
    command = [str(Path(sys.executable).with_name("bentoml")), "build", str(project_dir), "-f", str(bentofile),
               "--name", params.package.bento_name, "--output", "tag", "--arg", f"model_tag={model.tag}",
               *[arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]]
    done = subprocess.run(command, cwd=project_dir, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UservalueError(f"bentoml build failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:").strip()
    if ":" not in tag:
        raise ConfigError(f"bentoml build printed no tag: {done.stdout!r}")
    record = {
        "bento": tag,
        "bento_model": str(model.tag),
        "bentoml_home": _relative(Path(env["BENTOML_HOME"]), project_dir),
        "model_name": params.register_.model_name,
        "model_alias": params.package.model_alias,
        "model_version": str(version.version),
        "run_id": version.run_id,
        "model_type": run.data.tags.get("model", ""),
    }
    write_json(out_path, record)
    return record


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def read_package_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no package record", expected="the package stage's output (run `dvc repro package`)")
    return json.loads(path.read_text())

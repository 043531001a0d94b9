"""The package stage: the registered champion into the BentoML model store (labels: registry version,
run, metrics), and the recommender's champion (recs.model_name) when there is one, then an offline
`bentoml build` with those exact model tags -> reports/package.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from uservalue.config import Params
from uservalue.errors import InputError, TransientError
from uservalue.io import write_json
from uservalue.lifecycle.context import StageContext
from uservalue.lifecycle.metrics import VALUE_METRIC_KEYS
from uservalue.lifecycle.tracking import GIT_COMMIT_TAG
from uservalue.serving.bento_model import TYPE_LABEL, registry_labels

BENTOML_DIR = ".bentoml"
WHEEL_DIR = Path("dist")


def bentoml_home(ctx: StageContext) -> Path:
    """BENTOML_HOME, else params package.bentoml_home, else .bentoml in the project."""
    configured = os.environ.get("BENTOML_HOME") or ctx.params.package.bentoml_home
    return ctx.path(configured or BENTOML_DIR).resolve()


def bentoml_env(ctx: StageContext) -> dict[str, str]:
    from uservalue.lifecycle.tracking import tracking_uri

    return {**os.environ, "BENTOML_HOME": str(bentoml_home(ctx)), "BENTOML_DO_NOT_TRACK": "true",
            "MLFLOW_TRACKING_URI": tracking_uri(ctx.params.tracking, ctx.root)}


def _champion(ctx: StageContext) -> tuple[Any, Any]:
    import mlflow

    from uservalue.lifecycle.registry import registered_version

    version = registered_version(ctx, ctx.params.package.model_alias)
    return version, mlflow.MlflowClient().get_run(version.run_id)


def _import_model(version: Any, run: Any, params: Params) -> Any:
    import bentoml

    name = params.register_.model_name
    labels = {**registry_labels(name, version.version, version.run_id), TYPE_LABEL: run.data.tags.get("model", "")}
    try:
        stored = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        stored = []
    except OSError as error:
        raise TransientError(f"BentoML store {os.environ.get('BENTOML_HOME')}: {error}") from error
    for existing in stored:
        if all(existing.info.labels.get(k) == v for k, v in labels.items()):
            return existing
    metadata = {
        "registered_as": params.package.model_alias,
        "metrics": {k: float(version.tags[f"eval_{k}"]) for k in VALUE_METRIC_KEYS if f"eval_{k}" in version.tags},
        "eval_cutoff": version.tags.get("eval_cutoff", ""),
        "training_data": {k.removeprefix("dvc."): v for k, v in run.data.tags.items() if k.startswith("dvc.")},
        "features_md5": version.tags.get("features_md5", ""),
        "git_commit": run.data.tags.get(GIT_COMMIT_TAG, ""),
    }
    try:
        return bentoml.mlflow.import_model(name, model_uri=f"models:/{name}/{version.version}", labels=labels,
                                           metadata=metadata)
    except OSError as error:  # the model store or the artifact download
        raise TransientError(f"importing models:/{name}/{version.version} into the BentoML store: {error}") from error


def _import_recs(ctx: StageContext) -> tuple[Any, Any] | None:
    """(BentoML model, registry version) of the recommender's `package.model_alias` version; None without one."""
    import bentoml

    from uservalue.lifecycle.recs_registry import registered_recs_version

    version = registered_recs_version(ctx, ctx.params.package.model_alias)
    if version is None:
        return None
    name = ctx.params.recs.model_name
    labels = {**registry_labels(name, version.version, version.run_id), TYPE_LABEL: version.tags.get("model", "")}
    try:
        stored = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        stored = []
    except OSError as error:
        raise TransientError(f"BentoML store {os.environ.get('BENTOML_HOME')}: {error}") from error
    for existing in stored:
        if all(existing.info.labels.get(k) == v for k, v in labels.items()):
            return existing, version
    metadata = {"registered_as": ctx.params.package.model_alias,
                "metrics": {k.removeprefix("eval_"): float(v) for k, v in version.tags.items() if k.startswith("eval_")
                            and k != "eval_cutoff"},
                "eval_cutoff": version.tags.get("eval_cutoff", "")}
    try:
        model = bentoml.mlflow.import_model(name, model_uri=f"models:/{name}/{version.version}", labels=labels,
                                            metadata=metadata)
    except OSError as error:
        raise TransientError(f"importing models:/{name}/{version.version} into the BentoML store: {error}") from error
    return model, version


def build_wheel(project_dir: Path) -> Path:
    """The uservalue wheel the Bento installs (built offline from this checkout)."""
    out = project_dir / WHEEL_DIR
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(out), str(project_dir)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TransientError(f"building the uservalue wheel failed:\n{done.stderr.strip()}")
    wheels = sorted(out.glob("uservalue-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1]


def check_bentofile(path: Path) -> None:
    """A bentofile that cannot build is bad configuration (exit 2), not a build failure to retry."""
    if not path.is_file():
        raise InputError(path, "bentofile does not exist", expected="the project's bentofile.yaml")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(path, f"not valid YAML: {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("service"), str):
        raise InputError(path, "no service to build", column="service", expected="service: <module>:<Service class>")


def clean_build_debris(home: Path) -> list[Path]:
    """Remove what killed builds left in `<home>/tmp/` (BentoML's build folder; only `bentoml build` uses
    it, and the package stage runs one at a time under DVC's lock); the paths removed."""
    tmp = home / "tmp"
    removed = []
    for entry in sorted(tmp.iterdir()) if tmp.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def prune_bentos(name: str, keep: int, current: str) -> list[str]:
    """Delete all but the newest `keep` Bentos called `name` (never `current`), then the models of the
    same name that no kept Bento uses; the tags deleted."""
    import bentoml

    try:
        bentos = sorted(bentoml.bentos.list(name), key=lambda b: b.info.creation_time, reverse=True)
    except bentoml.exceptions.NotFound:
        return []
    kept = [b for b in bentos if str(b.tag) == current] + [b for b in bentos if str(b.tag) != current]
    kept, old = kept[:max(keep, 1)], kept[max(keep, 1):]
    deleted = []
    for bento in old:
        bentoml.bentos.delete(str(bento.tag))
        deleted.append(str(bento.tag))
    used = {str(m.tag) for b in kept for m in b.info.all_models}
    # Every model name the kept Bentos use (the value model and the recommender).
    for model_name in sorted({str(m.tag).split(":")[0] for b in kept for m in b.info.all_models}):
        for model in bentoml.models.list(model_name):
            if str(model.tag) not in used:
                bentoml.models.delete(str(model.tag))
                deleted.append(str(model.tag))
    return deleted


def run_package(ctx: StageContext, bentofile: str | Path, out_path: str | Path) -> dict[str, Any]:
    params, project_dir = ctx.params, ctx.root.resolve()
    bentofile = ctx.path(bentofile)
    check_bentofile(bentofile)
    env = bentoml_env(ctx)
    os.environ.update({k: env[k] for k in ("BENTOML_HOME", "BENTOML_DO_NOT_TRACK")})  # before bentoml is imported
    clean_build_debris(Path(env["BENTOML_HOME"]))
    version, run = _champion(ctx)
    model = _import_model(version, run, params)
    recs = _import_recs(ctx)
    build_wheel(project_dir)
    labels = registry_labels(params.register_.model_name, version.version, version.run_id)
    command = [str(Path(sys.executable).with_name("bentoml")), "build", str(project_dir), "-f", str(bentofile),
               "--name", params.package.bento_name, "--output", "tag", "--arg", f"model_tag={model.tag}",
               *(["--arg", f"recs_tag={recs[0].tag}"] if recs else []),
               *[arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]]
    done = subprocess.run(command, cwd=project_dir, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TransientError(f"bentoml build failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:").strip()
    if ":" not in tag:
        raise TransientError(f"bentoml build printed no tag: {done.stdout!r}")
    record = {
        "bento": tag,
        "bento_model": str(model.tag),
        "bentoml_home": _relative(Path(env["BENTOML_HOME"]), project_dir),
        "model_name": params.register_.model_name,
        "model_alias": params.package.model_alias,
        "model_version": str(version.version),
        "run_id": version.run_id,
        "model_type": run.data.tags.get("model", ""),
        "recs_model": ({"bento_model": str(recs[0].tag), "model_name": params.recs.model_name,
                        "model_version": str(recs[1].version), "run_id": recs[1].run_id,
                        "model_type": recs[1].tags.get("model", "")} if recs else None),
    }
    write_json(out_path, record)
    keep = params.package.keep_bentos
    try:
        record_pruned = prune_bentos(params.package.bento_name, keep, tag)
    except OSError as error:  # pruning is housekeeping: the new Bento stands
        print(f"package: pruning old Bentos failed: {error}", file=sys.stderr)
    else:
        if record_pruned:
            print(f"package: removed {len(record_pruned)} old Bento(s)/model(s) (keeping {keep}): "
                  f"{', '.join(record_pruned)}", file=sys.stderr)
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

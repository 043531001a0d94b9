"""Run one DVC stage with temporary params overrides (what an Airflow task does): params.yaml holds the
overrides for that stage only, under a workspace lock. Exit codes: see docs/orchestration.md."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from uservalue.config import Params, apply_overrides, parse_params
from uservalue.errors import EXIT_TRANSIENT, ConfigError
from uservalue.io import write_text

PARAMS_FILE = "params.yaml"
BACKUP_NAME = "uservalue-params-before-overrides.yaml"
LOCK_NAME = "uservalue-stage.lock"
# DVC reports a failed stage command as "... failed to run: <cmd>, exited with <code>".
_STAGE_EXIT = re.compile(r"exited with (-?\d+)")
# DVC's messages when another process holds its repository lock (dvc.lock) or an output's rwlock (dvc.rwlock).
_DVC_LOCK_BUSY = ("Unable to acquire lock", "is busy, it is being blocked by")


def effective_params(project_dir: Path, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], Params]:
    """params.yaml with the overrides applied, checked by the same models every stage uses."""
    path = project_dir / PARAMS_FILE
    try:
        raw = yaml.safe_load(_original_params_text(project_dir)) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    merged = apply_overrides(raw, overrides, str(path))
    label = f"{path} with overrides {sorted(overrides)}" if overrides else str(path)
    return merged, parse_params(merged, label)


def stage_targets(stage: str, params: Params) -> list[str]:
    """The dvc.yaml stage names behind one pipeline step: `train` is one stage per model."""
    if stage == "train":
        return [f"train@{name}" for name in params.train.models]
    return [stage]


def _tmp_dir(project_dir: Path) -> Path:
    path = project_dir / ".dvc" / "tmp"
    if not (project_dir / ".dvc").is_dir():
        raise ConfigError(f"{project_dir}: not a DVC project (no .dvc directory); run `dvc init` there first")
    path.mkdir(exist_ok=True)
    return path


def _original_params_text(project_dir: Path) -> str:
    """params.yaml as the user left it (the backup if a killed stage run left overrides in place)."""
    backup = project_dir / ".dvc" / "tmp" / BACKUP_NAME
    path = project_dir / PARAMS_FILE
    if backup.is_file():
        return backup.read_text()
    if not path.is_file():
        raise ConfigError(f"{path}: params file does not exist")
    return path.read_text()


def restore_params(project_dir: Path) -> bool:
    """Put back params.yaml from a leftover backup; True if there was one."""
    backup = project_dir / ".dvc" / "tmp" / BACKUP_NAME
    if not backup.is_file():
        return False
    write_text(project_dir / PARAMS_FILE, backup.read_text())
    backup.unlink()
    return True


@contextmanager
def workspace_lock(project_dir: Path, wait_message: str = "") -> Iterator[None]:
    """One stage run at a time in a workspace (held across override, dvc repro and restore)."""
    with open(_tmp_dir(project_dir) / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait_message:
                print(wait_message, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def overridden_params(project_dir: Path, merged: Mapping[str, Any] | None) -> Iterator[None]:
    """params.yaml holds `merged` (effective_params' first value) inside the block, its original text after it.

    None: nothing to override, params.yaml is left alone.
    """
    if merged is None:
        yield
        return
    path = project_dir / PARAMS_FILE
    backup = _tmp_dir(project_dir) / BACKUP_NAME
    write_text(backup, path.read_text())
    try:
        write_text(path, yaml.safe_dump(merged, sort_keys=False))
        yield
    finally:
        restore_params(project_dir)


@dataclass(frozen=True)
class StageRun:
    targets: list[str]
    exit_code: int
    seconds: float


def _child_env(environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    # `python` in dvc.yaml commands must be this interpreter (the environment that has uservalue).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _run_streaming(command: list[str], cwd: Path, env: Mapping[str, str]) -> int:
    """Run `dvc repro`, copying output line by line (Airflow's log shows it live); the stage run's exit code.

    The stage command's own code when DVC reports one (killed by signal N: 128+N, as a shell says);
    75 (EXIT_TRANSIENT) when another process holds DVC's lock; 1 for any other DVC failure.
    """
    stage_code: int | None = None
    lock_busy = False
    with subprocess.Popen(command, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if "failed to reproduce" in line and (match := _STAGE_EXIT.search(line)):
                stage_code = int(match.group(1))
            lock_busy = lock_busy or any(message in line for message in _DVC_LOCK_BUSY)
        dvc_code = process.wait()
    if dvc_code == 0:
        return 0
    if stage_code or dvc_code < 0:  # the stage command's own code, or DVC itself was killed
        code = stage_code or dvc_code
        return 128 - code if code < 0 else code
    return EXIT_TRANSIENT if lock_busy else 1


def run_stage(project_dir: Path, stage: str, overrides: Mapping[str, Any] | None = None, *, force: bool = False,
              environ: Mapping[str, str] | None = None) -> StageRun:
    """`dvc repro --single-item` each target of `stage` (e.g. `validate`, `train`, `train@mlp`) under overrides."""
    project_dir = project_dir.resolve()
    overrides = dict(overrides or {})
    start = time.perf_counter()
    with workspace_lock(project_dir, f"waiting for another stage run in {project_dir} to finish"):
        if restore_params(project_dir):
            print(f"restored {PARAMS_FILE} left with overrides by an interrupted stage run", file=sys.stderr)
        merged, params = effective_params(project_dir, overrides)  # bad overrides fail here, before DVC runs
        targets = [stage] if "@" in stage else stage_targets(stage, params)
        code = 0
        with overridden_params(project_dir, merged if overrides else None):
            for target in targets:
                command = [sys.executable, "-m", "dvc", "repro", "--single-item", target]
                if force:
                    command.append("--force")
                print(f"$ dvc repro --single-item {target}{' --force' if force else ''}  (in {project_dir}"
                      + (f"; overrides {overrides}" if overrides else "") + ")", flush=True)
                code = _run_streaming(command, project_dir, _child_env(environ or os.environ))
                if code != 0:
                    break
    return StageRun(targets=targets, exit_code=code, seconds=time.perf_counter() - start)


def plan(project_dir: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a retrain with these overrides would run: checked params, the models and their train stages."""
    project_dir = project_dir.resolve()
    _, params = effective_params(project_dir, dict(overrides or {}))
    split = plan_split(project_dir, params, dict(overrides or {}))
    return {
        "overrides": dict(overrides or {}),
        "models": list(params.train.models),
        "train_stages": stage_targets("train", params),
        "data_source": params.data.source,
        "eval_cutoff": split.get("eval_cutoff", str(params.split.eval_cutoff)),
        "split": split,
    }


VALIDATED_EVENTS = "data/validated.parquet"


def plan_split(project_dir: Path, params: Params, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The cutoffs a retrain would use: explicit ones as they are; `auto` ones resolved from the validated
    log in the project (as featurize will, into reports/split.json), unless the overrides change the data
    (then featurize resolves them after ingest)."""
    from uservalue.data.window import resolve_split_for, split_record

    events = project_dir / VALIDATED_EVENTS
    data_changed = sorted(k for k in overrides if k.split(".")[0] == "data" or k.startswith("validate.ts_"))
    if params.split.is_resolved:
        return split_record(params.split, params.split, params.data.source, None) | {"resolved_from": "params"}
    if data_changed or not events.is_file():
        why = f"the overrides {data_changed} change the data" if data_changed else f"no {VALIDATED_EVENTS} yet"
        return {"eval_cutoff": str(params.split.eval_cutoff), "horizon_days": params.split.horizon_days,
                "train_cutoffs": params.split.train_cutoffs if params.split.train_cutoffs == "auto"
                else [str(c) for c in params.split.train_cutoffs],
                "resolved_from": None, "note": f"auto: resolved by featurize from the validated log ({why})"}
    resolved, observed = resolve_split_for(params.split, params.data, params.validate_, events)
    return split_record(params.split, resolved, params.data.source, observed) | {"resolved_from": VALIDATED_EVENTS}

"""Stage runs with temporary overrides (uservalue.orchestration.stage_runner), the Airflow-side helpers
(uservalue.orchestration.airflow_tasks) and the `make airflow` launcher's settings (uservalue.orchestration.airflow_local).

The stage runner is exercised with real DVC in a throw-away git repository whose one stage
records the params it saw; DVC's locks are held with DVC's own lock API. How Airflow retries (or
not) on these exit codes: tests/e2e/test_airflow_retries.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.fs import localfs
from dvc.lock import Lock
from dvc.rwlock import rwlock

from tests.conftest import REPO_ROOT
from uservalue.errors import EXIT_BAD_INPUT, EXIT_DRIFT, EXIT_TRANSIENT, EXIT_VALIDATION_FAILED, ConfigError
from uservalue.orchestration.airflow_local import ensure_admin_password, standalone_env
from uservalue.orchestration.airflow_tasks import overrides_from_conf, retryable, uservalue_command
from uservalue.config import apply_overrides, parse_assignments
from uservalue.orchestration.stage_runner import BACKUP_NAME, effective_params, overridden_params, plan, run_stage

# A stage that copies the params it was run with, and fails with the code in params `toy.exit`
# (`kill`: dies by SIGKILL).
TOY_STAGE = """
import os, signal, sys, yaml
params = yaml.safe_load(open("params.yaml"))
open("seen.yaml", "w").write(yaml.safe_dump(params["toy"]))
print("toy stage ran", flush=True)
if params["toy"]["exit"] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(params["toy"]["exit"])
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The real params.yaml plus a `toy` section, and a dvc.yaml whose stage `toy` reads them."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["toy"] = {"value": 1, "exit": 0}
    (tmp_path / "params.yaml").write_text("# the user's comment survives\n" + yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "toy.py").write_text(TOY_STAGE)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"toy": {
        "cmd": "python toy.py", "deps": ["toy.py"], "params": ["toy"], "outs": [{"seen.yaml": {"cache": False}}]}}}))
    _git(tmp_path, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def test_assignments_parse_as_yaml_values() -> None:
    assert parse_assignments(["train.models=[linear, mlp]", "split.horizon_days=90", "data.path=a=b.csv"]) == {
        "train.models": ["linear", "mlp"], "split.horizon_days": 90, "data.path": "a=b.csv"}
    with pytest.raises(ConfigError, match="expected <section.key>=<value>"):
        parse_assignments(["train.models"])


def test_unknown_override_key_names_the_key_and_what_exists() -> None:
    raw = {"split": {"horizon_days": 273}}
    assert apply_overrides(raw, {"split.horizon_days": 90}) == {"split": {"horizon_days": 90}}
    assert raw == {"split": {"horizon_days": 273}}  # the input is not modified
    with pytest.raises(ConfigError, match=r"'split.horizon'.*no key 'horizon'.*known: horizon_days"):
        apply_overrides(raw, {"split.horizon": 90})
    with pytest.raises(ConfigError, match="no section 'nope'"):
        apply_overrides(raw, {"nope.x": 1})


def test_override_values_are_checked_like_params_yaml(project: Path) -> None:
    _, params = effective_params(project, {"train.models": ["linear"], "split.eval_cutoff": "1997-12-01"})
    assert params.train.models == ("linear",)
    with pytest.raises(ConfigError, match="unknown models"):
        effective_params(project, {"train.models": ["no_such_model"]})
    assert plan(project, {"train.models": ["linear", "mlp"]})["train_stages"] == ["train@linear", "train@mlp"]


def test_params_file_is_restored_even_when_the_block_fails(project: Path) -> None:
    before = (project / "params.yaml").read_text()
    merged, _ = effective_params(project, {"toy.value": 2})
    with pytest.raises(RuntimeError), overridden_params(project, merged):
        assert yaml.safe_load((project / "params.yaml").read_text())["toy"]["value"] == 2
        raise RuntimeError("stage crashed")
    assert (project / "params.yaml").read_text() == before
    assert not (project / ".dvc/tmp" / BACKUP_NAME).exists()


def test_stage_runs_through_dvc_with_overrides_and_leaves_params_as_they_were(project: Path) -> None:
    before = (project / "params.yaml").read_text()
    run = run_stage(project, "toy", {"toy.value": 7})
    assert run.exit_code == 0 and run.targets == ["toy"]
    assert yaml.safe_load((project / "seen.yaml").read_text())["value"] == 7  # the stage saw the override
    assert (project / "params.yaml").read_text() == before  # comments and all
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["toy"]["params"]["params.yaml"]["toy"]["value"] == 7  # DVC recorded what was used


def test_stage_exit_code_is_the_stage_commands_own(project: Path) -> None:
    assert run_stage(project, "toy", {"toy.exit": 2}).exit_code == 2  # bad input: final for Airflow
    assert run_stage(project, "toy", {"toy.exit": 5}).exit_code == 5
    assert run_stage(project, "toy", {"toy.exit": 75}).exit_code == 75  # the stage's own transient failure
    assert run_stage(project, "toy", {"toy.exit": "kill"}).exit_code == 128 + 9  # as a shell reports SIGKILL
    with pytest.raises(ConfigError, match="no key 'nope'"):
        run_stage(project, "toy", {"toy.nope": 1})  # rejected before DVC runs


def test_an_interrupted_run_is_healed_by_the_next(project: Path) -> None:
    before = (project / "params.yaml").read_text()
    (project / ".dvc/tmp").mkdir(exist_ok=True)
    (project / ".dvc/tmp" / BACKUP_NAME).write_text(before)  # as a killed stage run leaves it...
    (project / "params.yaml").write_text(before.replace("value: 1", "value: 99"))  # ...with overrides in place
    assert run_stage(project, "toy").exit_code == 0
    assert yaml.safe_load((project / "seen.yaml").read_text())["value"] == 1
    assert (project / "params.yaml").read_text() == before


def test_stage_cli_exits_with_the_stage_code(project: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "uservalue", "stage", "toy", "--project-dir", str(project),
                           "--set", "toy.exit=2"], check=False, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "toy stage ran" in done.stdout and "failed (exit 2)" in done.stderr


def test_dvc_repository_lock_held_elsewhere_exits_transient(project: Path) -> None:
    lock = Lock(str(project / ".dvc/tmp/lock"))  # what any other dvc command in the workspace holds
    lock.lock()
    try:
        done = subprocess.run([sys.executable, "-m", "uservalue", "stage", "toy", "--project-dir", str(project)],
                              check=False, capture_output=True, text=True)
    finally:
        lock.unlock()
    assert done.returncode == EXIT_TRANSIENT == 75, done.stdout + done.stderr
    assert "Unable to acquire lock" in done.stdout and "failed (exit 75)" in done.stderr
    assert not (project / "seen.yaml").exists()  # the stage never ran...
    assert run_stage(project, "toy").exit_code == 0  # ...and runs once the lock is free


def test_output_locked_by_another_dvc_process_exits_transient(project: Path) -> None:
    project = project.resolve()
    with rwlock(str(project / ".dvc/tmp"), localfs, "dvc repro (another)", [], [str(project / "seen.yaml")], False):
        assert run_stage(project, "toy").exit_code == EXIT_TRANSIENT  # DVC: "'.../seen.yaml' is busy"
    assert run_stage(project, "toy").exit_code == 0


def test_only_transient_failures_and_signals_are_retryable() -> None:
    assert retryable(EXIT_TRANSIENT)
    assert retryable(-9) and retryable(128 + 9) and retryable(128 + 15)  # killed: SIGKILL (OOM), SIGTERM
    for final in (EXIT_VALIDATION_FAILED, EXIT_BAD_INPUT, EXIT_DRIFT, 4, 127, 255):
        assert not retryable(final), final


def test_conf_becomes_overrides() -> None:
    conf = {"data_source": "file", "data_path": "data/raw/x.csv", "eval_cutoff": None, "models": [],
            "params": {"split.horizon_days": 90}, "force": True, "reason": "manual"}
    assert overrides_from_conf(conf) == {"data.source": "file", "data.path": "data/raw/x.csv",
                                         "split.horizon_days": 90}
    os.environ["USERVALUE_PROJECT_DIR"] = "/srv/uservalue"
    try:
        command = uservalue_command("stage", "ingest", overrides={"train.models": ["linear"]}, force=True)
    finally:
        del os.environ["USERVALUE_PROJECT_DIR"]
    assert command[1:] == ["-m", "uservalue", "stage", "ingest", "--project-dir", "/srv/uservalue",
                           "--set", 'train.models=["linear"]', "--force"]


def test_standalone_settings_are_local_and_yield_to_the_users(tmp_path: Path) -> None:
    env = standalone_env(tmp_path, 8123, environ={"PATH": "/usr/bin"})
    assert env["AIRFLOW_HOME"] == str(tmp_path / ".airflow")
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "8123"
    assert env["AIRFLOW__API__BASE_URL"] == "http://127.0.0.1:8123"  # tasks reach the execution API here
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(tmp_path / "dags")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False" and env["AIRFLOW__CORE__PARALLELISM"] == "4"
    assert env["USERVALUE_PROJECT_DIR"] == str(tmp_path)
    users = standalone_env(tmp_path, 8123, environ={
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://airflow@db/airflow",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor", "AIRFLOW_HOME": str(tmp_path / "elsewhere")})
    assert users["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert users["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
    assert users["AIRFLOW_HOME"] == str(tmp_path / "elsewhere")


def test_admin_password_is_generated_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / ".airflow" / "passwords.json"
    password, created = ensure_admin_password(path)
    assert created and len(password) >= 20
    assert json.loads(path.read_text()) == {"admin": password}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_admin_password(path) == (password, False)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="passwords.json: not valid JSON"):
        ensure_admin_password(path)

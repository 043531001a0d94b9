"""`kill -9` of pipeline stages mid-run (train, register, package): the champion alias is never lost,
the next run marks the killed run FAILED (no MLflow run left RUNNING), cleans the killed build's debris,
and a plain rerun completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import run_in, tool_env
from tests.support.serving import wait_until
from uservalue.lifecycle.tracking import PID_TAG

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def _client(project: Path) -> Any:  # an mlflow.MlflowClient on the project's store
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _champion(project: Path) -> str:
    return _client(project).get_model_version_by_alias("user-value", "champion").version


def _running_runs(project: Path) -> list:
    client = _client(project)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")


def _kill_when(project: Path, command: list[str], ready: Callable[[subprocess.Popen], bool]) -> bool:
    """Start `command` in the project, kill -9 its process group once `ready`; False if it ended first."""
    process = subprocess.Popen(command, cwd=project, env=tool_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    caught = wait_until(lambda: process.poll() is not None or ready(process), 300, step=0.05)
    killed = caught and process.poll() is None
    if killed:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    return killed


def test_killed_train_is_marked_failed_by_the_next_and_the_champion_stays(served_project: Path) -> None:
    champion = _champion(served_project)

    def run_started(process: subprocess.Popen) -> bool:
        return any(r.data.tags.get(PID_TAG) == str(process.pid) for r in _running_runs(served_project))

    assert _kill_when(served_project, ["uservalue", "train", "--model", "linear"], run_started), \
        "train ended before its MLflow run could be seen RUNNING"
    [orphan] = _running_runs(served_project)
    assert _champion(served_project) == champion
    run_in(served_project, "uservalue", "train", "--model", "linear")  # a plain rerun completes
    assert _client(served_project).get_run(orphan.info.run_id).info.status == "FAILED"
    assert _running_runs(served_project) == []
    assert (served_project / "models/linear/run.json").is_file()


def test_killed_register_keeps_the_champion_and_a_rerun_completes(served_project: Path) -> None:
    champion = _champion(served_project)
    began = time.monotonic()
    # Two seconds in: loading the candidate, re-scoring the champion or registering.
    _kill_when(served_project, ["uservalue", "register"], lambda _: time.monotonic() - began > 2)
    assert _champion(served_project) == champion
    json.loads((served_project / "reports/registry.json").read_text())  # whole (written atomically)
    run_in(served_project, "uservalue", "register")  # a plain rerun completes
    assert _client(served_project).get_model_version_by_alias("user-value", "champion") is not None


def test_killed_package_leaves_no_debris_after_the_next_and_old_bentos_are_pruned(served_project: Path) -> None:
    champion = _champion(served_project)
    tmp = served_project / ".bentoml" / "tmp"

    def building(_: subprocess.Popen) -> bool:
        return tmp.is_dir() and any(tmp.iterdir())

    if not _kill_when(served_project, ["uservalue", "package"], building):
        (tmp / "left-by-a-killed-build").mkdir(parents=True)  # the build was too quick to catch: its debris
    assert any(tmp.iterdir())
    assert _champion(served_project) == champion
    run_in(served_project, "uservalue", "package")  # a plain rerun completes, and cleans what the kill left
    assert not any(tmp.iterdir())
    current = json.loads((served_project / "reports/package.json").read_text())["bento"]
    store = served_project / ".bentoml"
    assert len([p for p in (store / "bentos/uservalue").iterdir() if p.name != "latest"]) >= 2
    prune = ("import json, sys; from uservalue.lifecycle.package import prune_bentos; "
             "print(json.dumps(prune_bentos('uservalue', 1, sys.argv[1])))")
    done = run_in(served_project, sys.executable, "-c", prune, current, env=tool_env(BENTOML_HOME=str(store)))
    assert json.loads(done.stdout.strip().splitlines()[-1])  # something was pruned
    assert [p.name for p in (store / "bentos/uservalue").iterdir() if p.name != "latest"] == [current.split(":")[1]]

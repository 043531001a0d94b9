"""A throw-away copy of the project in a fresh git + DVC repository, and a way to run tools in it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PROJECT_FILES = ["dvc.yaml", "params.yaml", "pipelines", "src", "dags", "data/raw/README.md", ".dvcignore",
                 ".gitignore", "service.py", "bentofile.yaml", "pyproject.toml", "README.md"]


def tool_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # A temporary project uses its own stores, whatever an earlier test left in this process.
    for leaked in ("MLFLOW_TRACKING_URI", "BENTOML_HOME"):
        env.pop(leaked, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.invalid",
               GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@example.invalid", **extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_in(repo: Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
           timeout: int = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, check=False, cwd=repo, env=env or tool_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def new_project(root: Path) -> Path:
    """A copy of the project in a fresh git + DVC repository at `root`, set up as `make install` does
    (`dvc plots show` uses the offline template)."""
    for name in PROJECT_FILES:
        source, target = REPO_ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target)
    run_in(root, "git", "init", "-q")
    run_in(root, "dvc", "init", "-q")
    for name in (".dvc/config", ".dvc/.gitignore"):
        shutil.copy2(REPO_ROOT / name, root / name)
    run_in(root, "uservalue", "offline-assets", "--dvc-template", ".dvc/plots-template.html")
    run_in(root, "git", "add", "-A")
    run_in(root, "git", "commit", "-qm", "project")
    return root


def copy_project(template: Path, root: Path) -> Path:
    """A copy at `root` of a project built elsewhere (git, DVC cache and lock, MLflow store, Bento store), as
    if built there: the MLflow store's absolute artifact locations are moved to the copy's own, so what the
    copy logs or deletes never touches the template. `root` must not exist."""
    shutil.copytree(template, root, symlinks=True)
    database = root / "mlflow.db"
    if database.is_file():
        old, new = str(template.resolve()), str(root.resolve())
        with contextlib.closing(sqlite3.connect(database)) as db, db:
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                    if any(kind in column[2].upper() for kind in ("CHAR", "TEXT", "CLOB")):
                        name = column[1]
                        db.execute(f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) WHERE instr("{name}", ?)',
                                   (f"{old}/", f"{new}/", f"{old}/"))
    return root


@pytest.fixture(scope="module")
def make_project(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    return lambda: new_project(tmp_path_factory.mktemp("project"))


def set_param(repo: Path, section: str, key: str, value: object) -> str:
    """Edit params.yaml as a user would; returns the original text to restore."""
    import yaml

    path = repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return original


# The recommenders that fit in about a second (no torch training, no EM): for tests whose subject is not the
# recommenders (orchestration, metadata stores), train_recs still runs, registers and is packaged. The
# others are trained in a pipeline by the served project (tests/support/serving.py) and the CDNOW repro.
QUICK_RECS = ["popularity", "cooccurrence"]


def use_synthetic_data(repo: Path, models: list[str], recs: list[str] | None = None, **synthetic: object) -> None:
    """A small synthetic world (3000 users on CDNOW's calendar) instead of CDNOW, as a user would set it;
    `recs`: the recommenders train_recs fits (their params.yaml settings), None: all of params.yaml's."""
    import yaml

    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["data"]["source"] = "synthetic"
    params["data"]["synthetic"].update({"users": 3000, "events_per_user": 60, "seed": 7, **synthetic})
    params["split"] = {"eval_cutoff": "1998-01-01", "horizon_days": 120, "train_cutoffs": ["1997-09-03", "1997-11-02"]}
    params["train"]["models"] = models
    if recs is not None:
        params["recs"]["models"] = {name: params["recs"]["models"][name] for name in recs}
    path.write_text(yaml.safe_dump(params, sort_keys=False))

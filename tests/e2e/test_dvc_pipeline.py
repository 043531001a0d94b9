"""The real pipeline: `dvc repro` and `dvc exp run` in a temporary git repository (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pipelines", "src", "data/raw/README.md", ".dvcignore", ".gitignore"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.invalid",
               GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@example.invalid")
    return env


def _run(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=repo, env=_env(), capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target)
    _run(root, "git", "init", "-q")
    _run(root, "dvc", "init", "-q")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "project")
    return root


@pytest.fixture(scope="module")
def reproduced(repo: Path) -> Path:
    _run(repo, "dvc", "repro")
    return repo


def test_repro_builds_every_stage_on_cdnow(reproduced: Path) -> None:
    evaluation = pd.read_parquet(reproduced / "data/features/eval.parquet")
    assert len(evaluation) == 23_570
    summary = json.loads((reproduced / "reports/validation/summary.json").read_text())
    assert summary["success"] and summary["rows"] == 69_659
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"ingest", "validate", "featurize"}
    assert lock["stages"]["featurize"]["params"]["params.yaml"]["split"]["horizon_days"] == 273


def test_second_repro_is_a_noop(reproduced: Path) -> None:
    started = time.perf_counter()
    second = _run(reproduced, "dvc", "repro")
    elapsed = time.perf_counter() - started
    assert "Data and pipelines are up to date" in second.stdout
    assert "Running stage" not in second.stdout
    status = _run(reproduced, "dvc", "status")
    assert "up to date" in status.stdout
    print(f"second dvc repro: {elapsed:.1f} s")  # reported, not asserted (shared machines are noisy)


def test_failed_gate_leaves_last_good_features_untouched(reproduced: Path) -> None:
    features = reproduced / "data/features/eval.parquet"
    before = _digest(features)
    # `dvc repro` takes no -S: edit params.yaml as a user would.
    params_path = reproduced / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["validate"]["min_users"] = 100_000_000
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        failed = _run(reproduced, "dvc", "repro", check=False)
    finally:
        params_path.write_text(original)
    assert failed.returncode != 0
    assert "validate.min_users" in failed.stdout + failed.stderr
    assert _digest(features) == before
    assert (reproduced / "data/validated.parquet").is_file()  # the last good output is still there
    summary = json.loads((reproduced / "reports/validation/summary.json").read_text())
    assert summary["success"] is False
    _run(reproduced, "dvc", "repro")  # back to green
    assert _digest(features) == before


def test_exp_run_with_synthetic_source(reproduced: Path) -> None:
    _run(reproduced, "dvc", "exp", "run", "-S", "data.source=synthetic", "-S", "data.synthetic.users=2000",
         "-S", "data.synthetic.events_per_user=40")
    truth = json.loads((reproduced / "data/truth/truth.json").read_text())
    assert truth["planted"] is True and truth["params"]["users"] == 2000
    evaluation = pd.read_parquet(reproduced / "data/features/eval.parquet")
    assert 1000 < len(evaluation) <= 2000 and evaluation["user_id"].str.startswith("u").all()
    shown = json.loads(_run(reproduced, "dvc", "exp", "show", "--json").stdout)
    assert json.dumps(shown).count("synthetic") >= 1

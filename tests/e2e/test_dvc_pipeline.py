"""The real pipeline: `dvc repro` and `dvc exp run` in a temporary git repository (slow)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.e2e.conftest import run_in, set_param

pytestmark = pytest.mark.slow


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(make_project) -> Path:
    return make_project()


@pytest.fixture(scope="module")
def reproduced(repo: Path) -> Path:
    run_in(repo, "dvc", "repro")
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
    second = run_in(reproduced, "dvc", "repro")
    elapsed = time.perf_counter() - started
    assert "Data and pipelines are up to date" in second.stdout
    assert "Running stage" not in second.stdout
    status = run_in(reproduced, "dvc", "status")
    assert "up to date" in status.stdout
    print(f"second dvc repro: {elapsed:.1f} s")  # reported, not asserted (shared machines are noisy)


def test_failed_gate_leaves_last_good_features_untouched(reproduced: Path) -> None:
    features = reproduced / "data/features/eval.parquet"
    before = _digest(features)
    # `dvc repro` takes no -S: edit params.yaml as a user would.
    original = set_param(reproduced, "validate", "min_users", 100_000_000)
    try:
        failed = run_in(reproduced, "dvc", "repro", check=False)
    finally:
        (reproduced / "params.yaml").write_text(original)
    assert failed.returncode != 0
    assert "validate.min_users" in failed.stdout + failed.stderr
    assert _digest(features) == before
    assert (reproduced / "data/validated.parquet").is_file()  # the last good output is still there
    summary = json.loads((reproduced / "reports/validation/summary.json").read_text())
    assert summary["success"] is False
    run_in(reproduced, "dvc", "repro")  # back to green
    assert _digest(features) == before


def test_exp_run_with_synthetic_source(reproduced: Path) -> None:
    run_in(reproduced, "dvc", "exp", "run", "-S", "data.source=synthetic", "-S", "data.synthetic.users=2000",
         "-S", "data.synthetic.events_per_user=40")
    truth = json.loads((reproduced / "data/truth/truth.json").read_text())
    assert truth["planted"] is True and truth["params"]["users"] == 2000
    evaluation = pd.read_parquet(reproduced / "data/features/eval.parquet")
    assert 1000 < len(evaluation) <= 2000 and evaluation["user_id"].str.startswith("u").all()
    shown = json.loads(run_in(reproduced, "dvc", "exp", "show", "--json").stdout)
    assert json.dumps(shown).count("synthetic") >= 1

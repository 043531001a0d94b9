"""Shared fixtures: real data (CDNOW from lifetimes; the Taobao sample where USERVALUE_SAMPLE_DIR names
it, see tests/support/samples.py) and small generated logs. Nothing here mocks a component."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

from uservalue.config import DataParams, SyntheticSource
from uservalue.data.sources import ingest
from uservalue.data.sources.synthetic import generate

from tests.support.samples import missing_sample_reason, real_taobao_sample, write_generated_taobao_csv

REPO_ROOT = Path(__file__).resolve().parents[1]
UTC = dt.UTC


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.fixture(scope="session")
def repo_params() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides ({"data.source": "taobao"}) to a copy of a params dict."""
    merged = copy.deepcopy(base)
    for dotted, value in overrides.items():
        target = merged
        *parents, last = dotted.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = value
    return merged


@pytest.fixture
def write_params(tmp_path: Path, repo_params: dict[str, Any]):
    def _write(overrides: dict[str, Any] | None = None, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(merge(repo_params, overrides or {})))
        return path

    return _write


@pytest.fixture(scope="session", params=["generated", "real"])
def taobao_sample(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Taobao UserBehavior CSV: every test that takes it runs on a generated file (always) and on the
    real sample (skipped, with the reason, when USERVALUE_SAMPLE_DIR does not name it)."""
    if request.param == "generated":
        return write_generated_taobao_csv(tmp_path_factory.mktemp("taobao_generated"))
    sample = real_taobao_sample()
    if sample is None:
        pytest.skip(missing_sample_reason())
    return sample


@pytest.fixture(scope="session")
def cdnow_events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cdnow") / "events.parquet"
    ingest(DataParams(source="cdnow"), out, out.parent / "truth")
    return out


@pytest.fixture(scope="session")
def taobao_events(tmp_path_factory: pytest.TempPathFactory, taobao_sample: Path) -> Path:
    out = tmp_path_factory.mktemp("taobao") / "events.parquet"
    ingest(DataParams(source="taobao", path=str(taobao_sample)), out, out.parent / "truth")
    return out


@pytest.fixture(scope="session")
def served_project_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small synthetic project through the whole DVC pipeline (a champion in MLflow, a built Bento),
    built once per session: the suites that serve it (tests/e2e/test_service.py, tests/reliability/) each
    take their own copy (tests.e2e.conftest.copy_project), so none sees what another changed."""
    from tests.support.serving import build_served_project

    return build_served_project(tmp_path_factory.mktemp("served-project-template"))


SMALL_SYNTHETIC = SyntheticSource(users=3000, events_per_user=60, seed=7)


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    generate(SMALL_SYNTHETIC, root / "events.parquet", root / "truth")
    return root / "events.parquet", root / "truth"

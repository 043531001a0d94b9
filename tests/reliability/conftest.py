"""The reliability suite's real components: one small synthetic project through the whole DVC pipeline
(a champion in MLflow, a built Bento) shared by the suite, and the service it packaged, served by a real
`uservalue serve` on a free 127.0.0.1 port (tests.support.serving)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import copy_project
from tests.support.serving import Server


@pytest.fixture(scope="session")
def served_project(served_project_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The session's built project (tests/conftest.py), copied: tests/e2e/test_service.py serves another copy.
    return copy_project(served_project_template, tmp_path_factory.mktemp("reliability-project") / "project")


@pytest.fixture(scope="session")
def server(served_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The packaged service, its prediction log flushed every half second (read while it runs)."""
    running = Server(served_project, tmp_path_factory.mktemp("reliability-served") / "prediction_log",
                     USERVALUE_LOG_FLUSH_SECONDS="0.5")
    yield running
    if running.process.poll() is None:
        running.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The pipeline-fault tests change the shared project (new runs, a new Bento, old ones pruned): they run
    after every other test of the session, which serve the Bento `dvc repro` built."""
    last = [item for item in items if item.path.name == "test_pipeline_faults.py"]
    if last:
        items[:] = [item for item in items if item not in last] + last

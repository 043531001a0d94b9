"""The installed `uservalue` command, run as a user would (a subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

EXE = shutil.which("uservalue", path=str(Path(sys.executable).parent))


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert EXE, "the uservalue console script is installed in the venv"
    return subprocess.run([EXE, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_one_command_per_stage() -> None:
    done = _run("--help")
    assert done.returncode == 0
    for command in ("ingest", "validate", "featurize", "generate", "train", "evaluate", "register"):
        assert command in done.stdout
    options = _run("generate", "--help").stdout
    for option in ("--users", "--events-per-user", "--seed", "--drift", "--out", "--truth-dir"):
        assert option in options


def test_generate_writes_events_and_truth(tmp_path: Path) -> None:
    done = _run("generate", "--users", "400", "--events-per-user", "30", "--seed", "5",
                "--out", str(tmp_path / "e.parquet"), "--truth-dir", str(tmp_path / "truth"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert pq.read_metadata(tmp_path / "e.parquet").num_rows > 400 * 25
    assert (tmp_path / "truth" / "users.parquet").is_file()
    assert "generate" in done.stderr  # progress and the summary line go to stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "--params", "missing.yaml"], "missing.yaml: params file does not exist"),
        (["featurize", "--events", "nowhere.parquet"], "nowhere.parquet: file does not exist"),
        (["train", "--model", "xgb"], "--model: unknown model 'xgb'"),
        (["train", "--model", "gbdt", "--features-dir", "nowhere"], "meta.json: feature metadata is missing"),
        (["evaluate", "--features-dir", "nowhere"], "meta.json: feature metadata is missing"),
        (["register", "--metrics", "nowhere.json"], "nowhere.json: evaluation metrics are missing"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    if args[0] != "ingest":
        shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", tmp_path / "params.yaml")
    done = _run(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_generate_rejects_out_of_range_drift(tmp_path: Path) -> None:
    done = _run("generate", "--drift", "1.5", cwd=tmp_path)
    assert done.returncode == 2 and "drift" in done.stderr.lower()


def test_an_unreachable_tracking_store_is_transient_exit_75(tmp_path: Path, cdnow_events: Path) -> None:
    """A real MLflow client against a tracking server that is not there: a retry may help, so the
    command exits 75 (EXIT_TRANSIENT, what the Airflow tasks retry), not 2 (bad input, final)."""
    import socket

    from tests.e2e.conftest import free_port, tool_env

    shutil.copy(Path(__file__).resolve().parents[2] / "params.yaml", tmp_path / "params.yaml")
    port = free_port()
    with socket.socket() as probe:  # nothing listens there
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    env = tool_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                   MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    done = subprocess.run([EXE, "score", "--events", str(cdnow_events)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 75, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr

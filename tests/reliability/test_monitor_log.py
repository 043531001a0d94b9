"""The monitor on a prediction log that holds values outside float range (what the service logged before
its limits: amount 1.7e308 became inf in the float32 features): it still gives a verdict, counting the
rows it left out, and with too few finite rows it is a clear bad-input error (exit 2), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.e2e.conftest import run_in
from uservalue.errors import EXIT_BAD_INPUT
from uservalue.io import atomic_path
from uservalue.serving.prediction_log import read_prediction_log

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def _log_with_infinities(project: Path, log_dir: Path, rows: int, infinite: int) -> None:
    """A prediction log of the champion's evaluation predictions, served now, `infinite` rows poisoned."""
    features = pd.read_parquet(project / "data/features/eval.parquet").head(rows).reset_index(drop=True)
    predictions = pd.read_parquet(project / "data/predictions/eval.parquet")
    champion = json.loads((project / "reports/metrics.json").read_text())["champion"]
    predictions = predictions[predictions["model"] == champion][["user_id", "p_buy", "expected_value"]]
    frame = features.merge(predictions, on="user_id")
    now = pd.Timestamp.now(tz="UTC")
    frame.insert(0, "request_time", now - pd.Timedelta(minutes=5))
    frame.insert(1, "request_id", "r")
    frame.insert(2, "as_of", now)
    frame["model_name"], frame["model_version"], frame["horizon_days"] = "user-value", "1", 120
    frame.loc[: infinite - 1, "monetary_sum"] = np.float32(np.inf)
    frame.loc[: infinite - 1, "expected_value"] = np.inf
    with atomic_path(log_dir / f"date={now.date().isoformat()}" / "part-test.parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def test_monitor_leaves_out_non_finite_rows_and_says_how_many(served_project: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    _log_with_infinities(served_project, log_dir, rows=400, infinite=3)
    assert np.isinf(read_prediction_log(log_dir)["expected_value"]).sum() == 3
    done = run_in(served_project, "uservalue", "monitor", "--current", "log", "--log-dir", str(log_dir),
                  "--out-dir", str(tmp_path / "monitoring"), check=False)
    assert done.returncode == 0, done.stderr
    latest = json.loads((tmp_path / "monitoring/latest.json").read_text())
    assert latest["non_finite_rows"]["current"] == {"expected_value": 3, "monetary_sum": 3}
    assert latest["current"]["rows"] == 400


def test_monitor_with_too_few_finite_rows_is_bad_input_not_a_crash(served_project: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    _log_with_infinities(served_project, log_dir, rows=120, infinite=60)
    done = run_in(served_project, "uservalue", "monitor", "--current", "log", "--log-dir", str(log_dir),
                  "--out-dir", str(tmp_path / "monitoring"), check=False)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert "Traceback" not in done.stderr and "min_rows" in done.stderr and "non-finite" in done.stderr

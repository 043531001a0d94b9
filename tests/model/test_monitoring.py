"""Evidently drift verdicts on planted data: a second log from the same generator is not flagged,
one with the `drift` knob turned up is, and the verdict names the drifted columns."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.model.conftest import SYNTHETIC_SPLIT, build_feature_sets
from uservalue.config import MonitorParams, SyntheticSource
from uservalue.data.sources.synthetic import generate
from uservalue.errors import InputError
from uservalue.lifecycle.monitor import drift_report, write_monitoring
from uservalue.models.base import FitContext
from uservalue.models.catalog import create_model

BEHAVIORS = ("view", "fav", "cart", "buy")


def _scored_window(root: Path, model, seed: int, drift: float) -> pd.DataFrame:
    events = root / f"events_{seed}_{drift}.parquet"
    generate(SyntheticSource(users=3000, events_per_user=60, seed=seed, drift=drift), events, root / f"truth_{seed}_{drift}")
    features = build_feature_sets(events, SYNTHETIC_SPLIT, root / f"features_{seed}_{drift}", BEHAVIORS).eval
    return features.merge(model.predict(features), on="user_id")


@pytest.fixture(scope="module")
def windows(synthetic_features, tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    model = create_model("linear", {}, synthetic_features.spec, synthetic_features.horizon_days)
    model.fit(synthetic_features.train, FitContext())
    reference = synthetic_features.eval.merge(model.predict(synthetic_features.eval), on="user_id")
    root = tmp_path_factory.mktemp("monitoring")
    return {
        "reference": reference,
        "same": _scored_window(root, model, seed=11, drift=0.0),
        "drifted": _scored_window(root, model, seed=11, drift=1.0),
    }


def test_undrifted_window_is_not_flagged(windows) -> None:
    _snapshot, verdict = drift_report(windows["reference"], windows["same"], MonitorParams())
    assert verdict["drift_detected"] is False, verdict["columns"]
    assert verdict["drifted_share"] < 0.5


def test_drifted_window_is_flagged_and_names_the_columns(windows, tmp_path: Path) -> None:
    snapshot, verdict = drift_report(windows["reference"], windows["drifted"], MonitorParams())
    assert verdict["drift_detected"] is True
    assert verdict["drifted_columns"] and set(verdict["drifted_columns"]) <= set(verdict["columns"])
    assert any(row["drifted"] for row in verdict["prediction_drift"].values())
    html = write_monitoring(snapshot, verdict, tmp_path, dt.datetime(2026, 11, 22, tzinfo=dt.UTC))
    assert html.name == "2026-11-22.html" and html.stat().st_size > 10_000
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["drift_detected"] is True and latest["report"] == html.name
    for column in verdict["drifted_columns"]:
        assert column in html.read_text()


def test_missing_columns_and_tiny_windows_are_clear_errors(windows) -> None:
    with pytest.raises(InputError, match=r"current.*missing monitored columns \['p_buy'\]"):
        drift_report(windows["reference"], windows["same"].drop(columns=["p_buy"]), MonitorParams())
    with pytest.raises(InputError, match="min_rows"):
        drift_report(windows["reference"], windows["same"].head(10), MonitorParams())


def test_non_finite_values_are_left_out_and_counted_not_a_crash(windows) -> None:
    """A prediction log that holds inf (an absurd amount overflowed float32 before the service's limits)
    still gets a verdict; the rows left out are counted per column (issue 19)."""
    current = windows["same"].copy()
    current.loc[current.index[:3], "expected_value"] = np.inf
    current.loc[current.index[:2], "monetary_sum"] = -np.inf
    _snapshot, verdict = drift_report(windows["reference"], current, MonitorParams())
    assert verdict["non_finite_rows"]["current"] == {"expected_value": 3, "monetary_sum": 2}
    assert verdict["non_finite_rows"]["reference"] == {}
    assert verdict["drift_detected"] is False
    mostly_bad = windows["same"].head(150).copy()
    mostly_bad.loc[mostly_bad.index[:100], "p_buy"] = np.inf
    with pytest.raises(InputError, match=r"only 50 rows with finite values.*non-finite.*min_rows"):
        drift_report(windows["reference"], mostly_bad, MonitorParams())

"""Features at a cutoff: exact values on a hand-made log, no leakage, the CDNOW split as documented."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import utc
from uservalue.config import FeaturizeParams, SplitParams
from uservalue.features.sql import FeatureSpec, build_features
from uservalue.features.store import label_windows, write_feature_sets
from uservalue.schema import EVENTS_SCHEMA

T = utc(2024, 1, 31)
SPEC = FeatureSpec(windows_days=(7, 30), sequence_length=3)


def _events(rows: list[tuple]) -> pa.Table:
    frame = pd.DataFrame(rows, columns=["user_id", "ts", "behavior", "item_id", "category_id", "amount"])
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    frame["quantity"] = 1.0
    return pa.Table.from_pandas(frame[list(EVENTS_SCHEMA.names)], schema=EVENTS_SCHEMA, preserve_index=False)


HAND_MADE = _events(
    [
        ("a", "2024-01-01", "view", "i1", "c1", 0.0),
        ("a", "2024-01-10", "cart", "i1", "c1", 0.0),
        ("a", "2024-01-11", "buy", "i1", "c1", 30.0),
        ("a", "2024-01-28", "view", "i2", "c2", 0.0),
        ("a", "2024-01-29", "buy", "i2", "c2", 10.0),
        ("a", "2024-02-05", "buy", "i3", "c2", 7.0),  # after T: label only
        ("b", "2024-01-30", "view", "i9", None, 0.0),
        ("c", "2024-02-02", "buy", "i1", "c1", 99.0),  # no history before T: not in the population
    ]
)


@pytest.fixture(scope="module")
def hand_made() -> dict[str, dict]:
    table = build_features(HAND_MADE, T, SPEC, label_end=T + dt.timedelta(days=30))
    return {row["user_id"]: row for row in table.to_pylist()}


def test_population_is_users_with_history_before_cutoff(hand_made) -> None:
    assert sorted(hand_made) == ["a", "b"]


def test_aggregates_by_hand(hand_made) -> None:
    a = hand_made["a"]
    assert a["n_events"] == 5 and a["active_days"] == 5
    assert a["recency_days"] == pytest.approx(2.0) and a["tenure_days"] == pytest.approx(30.0)
    assert a["mean_gap_days"] == pytest.approx(28.0 / 4)
    assert (a["n_categories"], a["n_items"]) == (2, 2)
    # Windows are [T - w days, T): the view exactly 30 days back is inside the 30-day window.
    assert (a["view_count"], a["view_count_7d"], a["view_count_30d"]) == (2, 1, 2)
    assert (a["buy_count"], a["buy_count_7d"], a["buy_count_30d"]) == (2, 1, 2)
    assert a["cart_recency_days"] == pytest.approx(21.0)
    assert a["fav_count"] == 0 and a["fav_recency_days"] == pytest.approx(30.0)  # never: whole history
    assert (a["monetary_sum"], a["monetary_mean"], a["monetary_max"]) == (40.0, 20.0, 30.0)
    assert (a["monetary_sum_7d"], a["monetary_sum_30d"]) == (10.0, 40.0)
    assert (a["purchase_days"], a["btyd_frequency"]) == (2, 1)
    assert a["btyd_recency_days"] == pytest.approx(18.0) and a["btyd_age_days"] == pytest.approx(20.0)
    b = hand_made["b"]
    assert (b["n_events"], b["monetary_sum"], b["purchase_days"], b["btyd_age_days"]) == (1, 0.0, 0, 0.0)
    assert b["n_categories"] == 0  # a null category is not a category


def test_sequences_keep_the_last_events_oldest_first(hand_made) -> None:
    a = hand_made["a"]
    ids = {b: i for i, b in enumerate(SPEC.behaviors, start=1)}
    assert a["seq_behavior"] == [ids["buy"], ids["view"], ids["buy"]]  # last 3 of 5, oldest first
    assert a["seq_log_age_days"] == pytest.approx([math.log1p(20), math.log1p(3), math.log1p(2)], rel=1e-6)
    assert a["seq_log_gap_days"] == pytest.approx([math.log1p(1), math.log1p(17), math.log1p(1)], rel=1e-6)
    assert a["seq_log_amount"] == pytest.approx([math.log1p(30), 0.0, math.log1p(10)], rel=1e-6)
    assert all(1 <= c <= SPEC.category_buckets for c in a["seq_category"])
    assert a["seq_item"][0] != a["seq_item"][1]  # i1 and i2 (equal buckets would be a 1/16384 fluke)
    b = hand_made["b"]
    assert b["seq_category"] == [0] and b["seq_log_gap_days"] == [0.0]


def test_labels_come_from_the_horizon_only(hand_made) -> None:
    assert (hand_made["a"]["value"], hand_made["a"]["n_purchases"], hand_made["a"]["bought"]) == (7.0, 1, True)
    assert (hand_made["b"]["value"], hand_made["b"]["bought"]) == (0.0, False)
    short = build_features(HAND_MADE, T, SPEC, label_end=T + dt.timedelta(days=3)).to_pylist()
    assert {r["user_id"]: r["value"] for r in short} == {"a": 0.0, "b": 0.0}


def test_serving_path_takes_a_dataframe_and_omits_labels() -> None:
    table = build_features(HAND_MADE.to_pandas(), T, SPEC)
    assert "value" not in table.column_names
    assert table.num_rows == 2


_event_after_cutoff = st.tuples(
    st.sampled_from(["a", "b", "c", "d"]),
    st.integers(min_value=0, max_value=60 * 86_400),  # seconds at or after T
    st.sampled_from(["view", "fav", "cart", "buy"]),
    st.floats(min_value=0, max_value=500, allow_nan=False),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    added=st.lists(_event_after_cutoff, max_size=12),
    drop_after=st.booleans(),
    scale_after=st.floats(min_value=0, max_value=10, allow_nan=False),
)
def test_no_leakage_events_at_or_after_cutoff_never_change_features(added, drop_after, scale_after) -> None:
    """Changing, deleting or adding any event at or after T leaves every feature at T unchanged."""
    baseline = build_features(HAND_MADE, T, SPEC).to_pandas()
    frame = HAND_MADE.to_pandas()
    after = frame["ts"] >= pd.Timestamp(T)
    frame.loc[after, "amount"] *= scale_after
    frame.loc[after, "behavior"] = "view"
    if drop_after:
        frame = frame[~after]
    extra = pd.DataFrame(
        [(u, pd.Timestamp(T) + pd.Timedelta(seconds=s), b, "iX", "cX", amt if b == "buy" else 0.0, 1.0)
         for u, s, b, amt in added],
        columns=["user_id", "ts", "behavior", "item_id", "category_id", "amount", "quantity"],
    )
    changed = (pd.concat([frame, extra], ignore_index=True) if len(extra) else frame)[list(EVENTS_SCHEMA.names)]
    changed["ts"] = pd.to_datetime(changed["ts"], utc=True)
    after_change = build_features(changed, T, SPEC).to_pandas()
    pd.testing.assert_frame_equal(baseline, after_change)


def test_cdnow_eval_set_has_every_customer(cdnow_events: Path, tmp_path: Path) -> None:
    split = SplitParams(eval_cutoff="1997-10-01", horizon_days=273, train_cutoffs=["1997-07-01", "1997-04-01"])
    rows = write_feature_sets(cdnow_events, split, FeaturizeParams(), ("view", "fav", "cart", "buy"),
                              tmp_path / "features")
    evaluation = pd.read_parquet(tmp_path / "features" / "eval.parquet")
    assert rows["eval"] == len(evaluation) == 23_570 == evaluation["user_id"].nunique()
    assert (evaluation["value"] == 0).sum() > 10_000  # most customers buy nothing in the holdout: kept
    events = pd.read_parquet(cdnow_events)
    start, end = pd.Timestamp("1997-10-01", tz="UTC"), pd.Timestamp("1998-07-01", tz="UTC")
    holdout = events[(events["ts"] >= start) & (events["ts"] < end)]
    assert evaluation["value"].sum() == pytest.approx(holdout["amount"].sum())
    train = pd.read_parquet(tmp_path / "features" / "train.parquet")
    assert set(train["label_days"]) == {92.0, 183.0}  # clipped at the evaluation cutoff
    assert sorted(train["cutoff"].unique()) == [pd.Timestamp("1997-04-01", tz="UTC"),
                                                pd.Timestamp("1997-07-01", tz="UTC")]
    assert pq.read_schema(tmp_path / "features" / "eval.parquet").field("seq_behavior").type == pa.list_(pa.uint8())


def test_training_labels_never_reach_the_holdout() -> None:
    split = SplitParams(eval_cutoff="2024-06-01", horizon_days=90, train_cutoffs=["2024-01-01", "2024-05-01"])
    windows = label_windows(split)
    assert all(end <= split.eval_cutoff_utc for _, end in windows["train"])
    assert windows["train"][0] == (utc(2024, 1, 1), utc(2024, 3, 31))
    assert windows["eval"] == [(utc(2024, 6, 1), utc(2024, 8, 30))]

"""The DuckDB feature definition (uservalue.features.sql) agrees with the plain pandas reference."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from uservalue.config import SyntheticSource
from uservalue.features.sql import FeatureSpec, build_features
from tests.support.reference_features import REFERENCE_SEQUENCE_COLUMNS, build_features_pandas
from uservalue.data.sources.synthetic import generate

CUTOFF = dt.datetime(1997, 10, 1, tzinfo=dt.UTC)
LABEL_END = CUTOFF + dt.timedelta(days=273)  # 1998-07-01


def _duckdb_frame(events, cutoff, spec, label_end) -> pd.DataFrame:
    frame = build_features(events, cutoff, spec, label_end=label_end).to_pandas()
    frame["cutoff"] = frame["cutoff"].dt.tz_convert("UTC")
    return frame


def assert_same_features(duck: pd.DataFrame, ref: pd.DataFrame) -> None:
    """Every column the reference has is equal in both; floats to a tight tolerance."""
    missing = set(ref.columns) - set(duck.columns)
    assert not missing, f"reference columns absent from the DuckDB output: {sorted(missing)}"
    assert set(duck.columns) - set(ref.columns) == {"seq_category", "seq_item"}
    assert len(duck) == len(ref) > 0
    assert duck["user_id"].tolist() == ref["user_id"].tolist()
    for column in ref.columns:
        d, r = duck[column], ref[column]
        if column in REFERENCE_SEQUENCE_COLUMNS:
            d_len, r_len = d.map(len).to_numpy(), r.map(len).to_numpy()
            np.testing.assert_array_equal(d_len, r_len, err_msg=f"{column}: list lengths")
            d_flat = np.concatenate([np.asarray(x, dtype=np.float64) for x in d])
            r_flat = np.concatenate([np.asarray(x, dtype=np.float64) for x in r])
            if column == "seq_behavior":
                np.testing.assert_array_equal(d_flat, r_flat, err_msg=column)
            else:  # float32 lists
                np.testing.assert_allclose(d_flat, r_flat, rtol=1e-6, atol=1e-6, err_msg=column)
        elif pd.api.types.is_float_dtype(d) or pd.api.types.is_float_dtype(r):
            np.testing.assert_allclose(
                d.to_numpy(np.float64), r.to_numpy(np.float64), rtol=1e-9, atol=1e-9, err_msg=column
            )
        else:
            assert d.tolist() == r.tolist(), column


@pytest.fixture(scope="module")
def synthetic_events(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("synthetic")
    out = root / "events.parquet"
    generate(SyntheticSource(users=300, events_per_user=40), out, root / "truth")
    return str(out)


def test_synthetic_log_matches_reference(synthetic_events: str) -> None:
    spec = FeatureSpec()
    duck = _duckdb_frame(synthetic_events, CUTOFF, spec, LABEL_END)
    events = pd.read_parquet(synthetic_events)
    ref = build_features_pandas(events, CUTOFF, spec, label_end=LABEL_END)
    assert_same_features(duck, ref)
    # The comparison is not vacuous: the log has buyers before and after the cutoff, users whose
    # history is longer than the sequence, and users with and without labels.
    assert (ref["monetary_sum"] > 0).any() and (ref["monetary_sum"] == 0).any()
    assert ref["bought"].any() and not ref["bought"].all()
    assert (ref["n_events"] > spec.sequence_length).any()


def test_synthetic_log_short_sequences_and_no_labels(synthetic_events: str) -> None:
    spec = FeatureSpec(windows_days=(1, 14), sequence_length=5)
    duck = _duckdb_frame(synthetic_events, CUTOFF, spec, None)
    ref = build_features_pandas(pd.read_parquet(synthetic_events), CUTOFF, spec)
    assert "value" not in ref.columns
    assert_same_features(duck, ref)


def _ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def tiny_events() -> pd.DataFrame:
    rows = [
        # user a: ties at one timestamp that only the secondary sort keys can order; the amounts
        # make the behaviour, item_id (NULLS LAST), category_id and amount tie-breaks all visible
        ("a", "1997-09-01 10:00:00", "view", "i2", "c1", 0.0),
        ("a", "1997-09-01 10:00:00", "buy", "i9", "c1", 1.0),
        ("a", "1997-09-01 10:00:00", "view", "i1", "c1", 0.0),
        ("a", "1997-09-01 10:00:00", "buy", None, "c2", 2.0),
        ("a", "1997-09-01 10:00:00", "buy", "i2", "c1", 12.5),
        ("a", "1997-09-01 10:00:00", "buy", "i9", "c0", 5.0),
        ("a", "1997-09-01 10:00:00", "buy", "i2", "c1", 3.0),
        ("a", "1997-09-20 08:30:00.250000", "cart", "i3", None, 0.0),
        ("a", "1997-09-30 23:59:59.999999", "fav", "i3", "c2", 0.0),
        ("a", "1997-10-01 00:00:00", "buy", "i3", "c2", 40.0),  # exactly at T: a label
        ("a", "1998-06-01 00:00:00", "buy", "i4", "c2", 7.0),
        ("a", "1998-07-01 00:00:00", "buy", "i4", "c2", 99.0),  # exactly at label_end: excluded
        # user b: a single event, no purchase, an unknown behaviour
        ("b", "1997-03-03 03:03:03", "share", "i9", "c9", 0.0),
        # user c: two events of the same user at the same timestamp, the only history
        ("c", "1997-09-29 12:00:00", "cart", "i5", "c5", 0.0),
        ("c", "1997-09-29 12:00:00", "buy", "i5", "c5", 20.0),
        # user d: events only after the cutoff, so not in the population
        ("d", "1997-11-11 11:11:11", "buy", "i1", "c1", 5.0),
    ]
    columns = ["user_id", "ts", "behavior", "item_id", "category_id", "amount"]
    frame = pd.DataFrame(rows, columns=columns)
    ts = pd.to_datetime(frame["ts"], utc=True, format="ISO8601")
    frame["ts"] = ts.astype("datetime64[us, UTC]")
    frame["quantity"] = 1.0
    # Shuffled, so neither implementation can rely on the input order.
    return frame.sample(frac=1.0, random_state=7).reset_index(drop=True)


def test_tiny_log_with_ties_matches_reference() -> None:
    spec = FeatureSpec(windows_days=(1, 7, 30), sequence_length=8)
    events = tiny_events()
    duck = _duckdb_frame(events, CUTOFF, spec, LABEL_END)
    ref = build_features_pandas(events, CUTOFF, spec, label_end=LABEL_END)
    assert_same_features(duck, ref)

    assert ref["user_id"].tolist() == ["a", "b", "c"]
    a, b, c = (ref.loc[ref["user_id"] == u].iloc[0] for u in "abc")
    # a: the last 8 of 9 in (t, behavior, item_id NULLS LAST, category_id, amount) order. At
    # 10:00: buy i2 3.0 (falls out), buy i2 12.5, buy i9 c0, buy i9 c1, buy NULL, view i1, view i2.
    assert list(a["seq_behavior"]) == [4, 4, 4, 4, 1, 1, 3, 2]
    log_amounts = [np.log(1 + x) for x in (12.5, 5.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0)]
    assert list(a["seq_log_amount"]) == pytest.approx(log_amounts, rel=1e-6)
    assert list(a["seq_log_gap_days"])[:6] == [0.0] * 6
    assert a["n_events"] == 9 and a["buy_count"] == 5 and a["monetary_sum"] == 23.5
    assert a["purchase_days"] == 1 and a["btyd_frequency"] == 0 and a["btyd_recency_days"] == 0.0
    assert a["value"] == 47.0 and a["n_purchases"] == 2 and a["bought"]
    assert b["n_events"] == 1 and b["mean_gap_days"] == b["tenure_days"]
    assert b["view_recency_days"] == b["tenure_days"] and list(b["seq_behavior"]) == [0]
    assert not b["bought"] and b["monetary_mean"] == 0.0
    # c: the buy sorts before the cart at the same second.
    assert list(c["seq_behavior"]) == [4, 3]
    assert list(c["seq_log_amount"]) == [pytest.approx(np.log(21.0)), 0.0]

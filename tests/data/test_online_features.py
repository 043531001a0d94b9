"""The numpy engine (uservalue.features.online) equals the DuckDB feature SQL, table for table:
same rows, columns and Arrow types; floats to 1e-9 relative, everything else exact."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import utc
from uservalue.features.online import (
    EventColumns,
    FeatureArrays,
    _log_f32,
    concat,
    epoch_seconds,
    event_columns,
    events_to_columns,
    online_arrays,
    online_features,
    output_schema,
)
from uservalue.features.sql import FeatureSpec, build_features
from uservalue.schema import EVENTS_SCHEMA

CDNOW_CUTOFFS = (utc(1997, 4, 1), utc(1997, 10, 1), utc(1998, 7, 1))
# Odd windows, short sequences and few buckets, so truncation and bucket collisions are exercised.
NARROW = FeatureSpec(windows_days=(1, 3, 30), sequence_length=4, category_buckets=7, item_buckets=97)


def assert_same_table(online: pa.Table, sql: pa.Table) -> None:
    assert online.schema.equals(sql.schema), f"schemas differ:\n{online.schema}\n---\n{sql.schema}"
    assert online.num_rows == sql.num_rows
    users = sql.column("user_id").to_pylist()
    for name in sql.column_names:
        got, want = online.column(name), sql.column(name)
        if pa.types.is_floating(want.type):
            np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-9, atol=0, err_msg=name)
        elif not got.equals(want):
            bad = next(i for i, (g, w) in enumerate(zip(got.to_pylist(), want.to_pylist(), strict=True)) if g != w)
            pytest.fail(f"{name}, user {users[bad]!r}: online {got[bad]} != sql {want[bad]}")


def assert_parity(events: pa.Table, cutoff: dt.datetime, spec: FeatureSpec,
                  columns: EventColumns | None = None) -> pa.Table:
    sql = build_features(events, cutoff, spec)
    online = online_features(columns if columns is not None else event_columns(events), cutoff, spec)
    assert_same_table(online, sql)
    return sql


@pytest.fixture(scope="module")
def cdnow(cdnow_events: Path) -> tuple[pa.Table, EventColumns]:
    table = pq.read_table(cdnow_events)
    return table, event_columns(table)


@pytest.fixture(scope="module")
def taobao(taobao_events: Path) -> tuple[pa.Table, EventColumns]:
    table = pq.read_table(taobao_events)
    return table, event_columns(table)


@pytest.fixture(scope="module")
def synthetic(small_synthetic: tuple[Path, Path]) -> tuple[pa.Table, EventColumns]:
    table = pq.read_table(small_synthetic[0])
    return table, event_columns(table)


@pytest.mark.parametrize("cutoff", CDNOW_CUTOFFS, ids=lambda c: c.date().isoformat())
def test_cdnow_every_user(cdnow, cutoff: dt.datetime) -> None:
    table, columns = cdnow
    sql = assert_parity(table, cutoff, FeatureSpec(), columns)
    if cutoff >= utc(1997, 10, 1):
        assert sql.num_rows == 23_570


@pytest.mark.parametrize("cutoff", CDNOW_CUTOFFS[1:], ids=lambda c: c.date().isoformat())
def test_synthetic_all_behaviours(synthetic, cutoff: dt.datetime) -> None:
    table, columns = synthetic
    assert set(pc.unique(table.column("behavior")).to_pylist()) == {"view", "fav", "cart", "buy"}
    assert_parity(table, cutoff, FeatureSpec(), columns)


def test_synthetic_narrow_spec(synthetic) -> None:
    table, columns = synthetic
    assert_parity(table, CDNOW_CUTOFFS[0], NARROW, columns)


def test_taobao_items_categories_and_ties(taobao) -> None:
    table, columns = taobao
    ts = table.column("ts")
    assert table.num_rows > pc.count_distinct(pc.binary_join_element_wise(
        table.column("user_id"), pc.cast(ts, pa.string()), "|")).as_py(), "the sample has same-second ties"
    assert table.column("item_id").null_count < table.num_rows
    end = pc.max(ts).as_py()
    at_an_event = pc.min(ts).as_py() + (end - pc.min(ts).as_py()) * 0.6  # then the nearest event's own time
    at_an_event = min(ts.to_pylist(), key=lambda x: abs(x - at_an_event))
    for cutoff in (at_an_event, end + dt.timedelta(seconds=1)):
        for spec in (FeatureSpec(), NARROW):
            assert_parity(table, cutoff, spec, columns)


def test_taobao_one_user_at_a_time_as_the_service_does(taobao) -> None:
    """Each user's events alone (the online store's unit) give that user's row of the whole table."""
    table, columns = taobao
    cutoff = pc.max(table.column("ts")).as_py() + dt.timedelta(seconds=1)
    whole = build_features(table, cutoff, NARROW)
    users = whole.column("user_id").to_pylist()
    parts = [columns.take(columns.user_id == u) for u in users[:20]]
    for i, part in enumerate(parts):
        assert_same_table(online_features(part, cutoff, NARROW), whole.slice(i, 1))
    assert_same_table(online_features(concat(parts[::-1]), cutoff, NARROW), whole.slice(0, 20))


def test_no_history_gives_no_rows_and_the_same_schema(taobao) -> None:
    table, columns = taobao
    cutoff = pc.min(table.column("ts")).as_py()  # strictly before: nothing
    assert_same_table(online_features(columns, cutoff, FeatureSpec()), build_features(table, cutoff, FeatureSpec()))
    assert_same_table(online_features(concat([]), cutoff, NARROW), build_features(table, cutoff, NARROW))


def test_log_as_float_matches_duckdb_next_to_float32_rounding_boundaries() -> None:
    """ln(x)::FLOAT: numpy's float64 log can be one bit off the C library's that DuckDB calls,
    which flips the float32 rounding when the log lies right at a float32 midpoint."""
    f = np.sort(np.random.default_rng(0).uniform(1e-6, 8, 30_000).astype(np.float32))
    midpoints = (f.astype(np.float64) + np.nextafter(f, np.float32(np.inf)).astype(np.float64)) / 2
    x = np.exp(midpoints)
    x = np.concatenate([x, np.nextafter(x, np.inf), np.nextafter(x, -np.inf)])
    with duckdb.connect() as con:
        con.register("logs", pa.table({"x": x}))
        expected = con.execute("SELECT ln(x)::FLOAT AS y FROM logs").fetchnumpy()["y"]
    np.testing.assert_array_equal(_log_f32(x), expected)
    assert _log_f32(np.array([1.0, math.e, 0.0]))[:2].tolist() == [0.0, np.float32(1.0)]


def test_naive_cutoff_is_refused(taobao) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        online_features(taobao[1], dt.datetime(2017, 12, 1), FeatureSpec())


BASE = utc(2024, 3, 1)
# Random small logs: few users (non-ASCII ones too, for the byte order of user_id), times drawn
# mostly from a few seconds so that ties are common, a behaviour outside the spec, null items and
# categories, zero amounts.
TIE_SECONDS = [0, 1, 86_399, 86_400, 5 * 86_400]
USERS = ["a", "b", "B", "ä", "a b", "\U0001f600", "10", "9"]
ROW = st.tuples(
    st.sampled_from(USERS),
    st.one_of(st.sampled_from(TIE_SECONDS), st.sampled_from(TIE_SECONDS), st.integers(0, 40 * 86_400)),
    st.sampled_from([0, 0, 0, 250_000]),  # microseconds
    st.sampled_from(["view", "fav", "cart", "buy", "return", "share"]),
    st.one_of(st.none(), st.sampled_from(["i1", "i2", "I1", "i10", "é"])),
    st.one_of(st.none(), st.sampled_from(["c1", "c2", "C", ""])),
    st.one_of(st.just(0.0), st.sampled_from([1.0, 2.5, 99.99]), st.floats(0, 1e4, allow_nan=False)),
)


def _table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [[]] * 7
    user, seconds, micros, behavior, item, category, amount = columns
    ts = [BASE + dt.timedelta(seconds=s, microseconds=m) for s, m in zip(seconds, micros, strict=True)]
    return pa.table(
        [pa.array(user, pa.string()), pa.array(ts, pa.timestamp("us", tz="UTC")), pa.array(behavior, pa.string()),
         pa.array(item, pa.string()), pa.array(category, pa.string()), pa.array([1.0] * len(rows)),
         pa.array(amount, pa.float64())],
        schema=EVENTS_SCHEMA,
    )


def test_ties_are_broken_in_the_window_order() -> None:
    """Events of one user in one second, differing at each later key of the SQL's window order
    (behavior, item_id, category_id, amount; nulls last), fed in many orders."""
    rows = [
        ("u", 0, 0, behavior, item, category, amount)
        for behavior in ("view", "buy", "share")
        for item in (None, "i2", "i1", "I1")
        for category in ("c2", None, "c1")
        for amount in (5.0, 0.0, 2.0)
    ]
    rows += [("v", 0, 0, "view", None, None, 1.0), ("v", 0, 0, "view", "i1", None, 1.0)]
    table = _table(rows)
    spec = FeatureSpec(sequence_length=len(rows))
    columns = event_columns(table)
    for seed in range(5):
        shuffled = columns.take(np.random.default_rng(seed).permutation(len(columns)))
        assert_parity(table, BASE + dt.timedelta(seconds=1), spec, shuffled)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(ROW, min_size=1, max_size=40),
    cutoff_seconds=st.one_of(st.integers(0, 45 * 86_400), st.sampled_from([1, 86_400, 5 * 86_400])),
    windows=st.lists(st.integers(1, 30), min_size=1, max_size=3, unique=True),
    sequence_length=st.integers(1, 6),
    buckets=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
    returns=st.booleans(),
)
def test_random_logs(rows, cutoff_seconds, windows, sequence_length, buckets, seed, returns) -> None:
    table = _table(rows)
    # With `return` among the behaviours, the money given back per window too (features.sql's return columns).
    spec = FeatureSpec(behaviors=("view", "fav", "cart", "buy", "return") if returns else FeatureSpec().behaviors,
                       windows_days=tuple(windows), sequence_length=sequence_length,
                       category_buckets=buckets, item_buckets=buckets + 1)
    cutoff = BASE + dt.timedelta(seconds=cutoff_seconds)
    columns = event_columns(table)
    # Any order in, the same table out.
    shuffled = columns.take(np.random.default_rng(seed).permutation(len(columns)))
    assert_parity(table, cutoff, spec, shuffled)


# --- the service's inputs and outputs without DuckDB or Arrow (the fast path, issue 15) ---------------
def _as_events_to_columns(table: pa.Table) -> EventColumns:
    """events_to_columns of a canonical events table's rows, as the scorer passes a request's events."""
    micros = table.column("ts").cast(pa.int64()).to_pylist()
    return events_to_columns(table.column("user_id").to_pylist(), micros, table.column("behavior").to_pylist(),
                             table.column("item_id").to_pylist(), table.column("category_id").to_pylist(),
                             table.column("amount").to_pylist())


def _assert_same_columns(got: EventColumns, want: EventColumns) -> None:
    for name in ("user_id", "t", "behavior", "item_id", "category_id", "amount", "item_hash", "category_hash"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        assert getattr(got, name).dtype == getattr(want, name).dtype, name


def test_epoch_seconds_is_duckdbs_epoch_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    micros = np.concatenate([rng.integers(-10**16, 4 * 10**15, 100_000), rng.integers(0, 2 * 10**15, 1000) // 1000])
    with duckdb.connect() as con:
        con.register("times", pa.table({"ts": pa.array(micros, pa.timestamp("us", tz="UTC"))}))
        expected = con.execute("SELECT epoch(ts)::DOUBLE AS t FROM times").fetchnumpy()["t"]
    np.testing.assert_array_equal(epoch_seconds(micros), expected)
    assert not np.array_equal(micros / 1e6, expected), "micros / 1e6 is not DuckDB's epoch (the test's premise)"


def test_events_to_columns_equals_event_columns(synthetic) -> None:
    table, columns = synthetic
    assert table.column("item_id").null_count < 5_000, "the test needs item ids"
    _assert_same_columns(_as_events_to_columns(table.slice(0, 5_000)), columns.take(np.arange(5_000)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=40), cutoff_seconds=st.integers(0, 45 * 86_400))
def test_events_to_columns_gives_the_same_features(rows, cutoff_seconds) -> None:
    table = _table(rows)
    columns = _as_events_to_columns(table)
    _assert_same_columns(columns, event_columns(table))
    assert_parity(table, BASE + dt.timedelta(seconds=cutoff_seconds), NARROW, columns)


def test_feature_arrays_take_and_concat_are_the_rows_of_the_table(synthetic) -> None:
    columns = synthetic[1]
    cutoff = CDNOW_CUTOFFS[1]
    arrays = online_arrays(columns, cutoff, NARROW)
    whole = online_features(columns, cutoff, NARROW)
    assert_same_table(arrays.to_arrow(), whole)
    rows = np.array([7, 3, 3, len(arrays) - 1, 0])
    assert_same_table(arrays.take(rows).to_arrow(), whole.take(rows))
    both = FeatureArrays.concat([arrays.take(rows[:2]), arrays.take(rows[2:])])
    assert_same_table(both.to_arrow(), whole.take(rows))
    # The model's matrix: the DataFrame's float64 values, exactly.
    aggregates = NARROW.aggregate_columns()
    np.testing.assert_array_equal(arrays.matrix(aggregates), whole.to_pandas()[aggregates].to_numpy(dtype=np.float64))
    empty = online_arrays(columns, utc(1990, 1, 1), NARROW)
    assert len(empty) == 0 and empty.to_arrow().equals(output_schema(NARROW).empty_table())

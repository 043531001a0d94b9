"""Spark and DuckDB compute the same features (issue 14 §1): the bucket hash is the same in Python,
DuckDB and Spark SQL; on a hand-made log with ties and null ids, on CDNOW and on a synthetic log with
every behaviour, the Spark featurize stage writes the same files as the DuckDB one, for every cutoff
(floats to 1e-9 relative, lists and everything else exactly, the same Parquet types and meta.json).
Real PySpark in local mode, one session for the whole file; nothing is mocked."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import utc
from uservalue.config import FeaturizeParams, SparkParams, SplitParams
from uservalue.features import buckets
from uservalue.features.spark import (
    feature_table,
    register_spark_events,
    spark_features,
    spark_session,
    write_feature_sets_spark,
)
from uservalue.features.sql import FeatureSpec, build_features
from uservalue.features.store import write_feature_sets
from uservalue.schema import DEFAULT_BEHAVIORS, EVENTS_SCHEMA

# Two cores and small shuffles: the machines running the suite are small and shared.
TEST_SPARK = SparkParams(master="local[2]", driver_memory="2g", config={
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "2",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
})
# The repository's split (params.yaml): CDNOW and the synthetic log share its calendar.
SPLIT = SplitParams(eval_cutoff="1997-10-01", horizon_days=273, train_cutoffs=["1997-07-01", "1997-04-01"])
REL = 1e-9


@pytest.fixture(scope="session")
def spark() -> Iterator:
    session = spark_session(TEST_SPARK, "uservalue-tests")
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


# --- the bucket hash ------------------------------------------------------------------------------

def _duckdb_hashes(values: list[str | None], n_buckets: int) -> tuple[list, list]:
    con = duckdb.connect()
    try:
        con.register("ids", pa.table({"v": pa.array(values, pa.string())}))
        rows = con.execute(f"SELECT {buckets.duckdb_hash_sql('v')}, "
                           f"{buckets.duckdb_bucket_sql('v', n_buckets)} FROM ids").fetchall()
    finally:
        con.close()
    return [r[0] for r in rows], [r[1] for r in rows]


def _spark_hashes(spark, values: list[str | None], n_buckets: int) -> tuple[list, list]:
    frame = spark.createDataFrame([(i, v) for i, v in enumerate(values)], "i int, v string")
    rows = frame.selectExpr("i", f"{buckets.spark_hash_sql('v')} AS h",
                            f"{buckets.spark_bucket_sql('v', n_buckets)} AS b").orderBy("i").collect()
    return [r["h"] for r in rows], [r["b"] for r in rows]


def _python_hashes(values: list[str | None], n_buckets: int) -> tuple[list, list]:
    array = np.array(values, dtype=object)
    hashes = [None if v is None else int(h) for v, h in zip(values, buckets.hash_values(array), strict=True)]
    return hashes, buckets.bucket_values(array, n_buckets).tolist()


def test_bucket_hash_is_written_down() -> None:
    # md5("abc") = 900150983cd24fb0d6963f7d28e17f72: its first 15 hex digits, as an integer.
    assert buckets.id_hash("abc") == 0x900150983CD24FB
    assert buckets.bucket_values(np.array(["abc", None], dtype=object), 1024).tolist() == [
        0x900150983CD24FB % 1024 + 1, 0]


# Ids are text of any script; NUL is left out (no engine's id column holds it).
_ids = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.one_of(st.none(), _ids), min_size=1, max_size=50),
       n_buckets=st.integers(1, 20_000))
def test_bucket_hash_is_identical_in_python_and_duckdb(values, n_buckets) -> None:
    assert _duckdb_hashes(values, n_buckets) == _python_hashes(values, n_buckets)


def _random_ids(n: int, seed: int = 0) -> list[str | None]:
    """Random ids over the whole of Unicode (1- to 4-byte UTF-8, no surrogates, no NUL), one in ten
    null, one empty, some repeated: many in one Spark job, since each job costs about a second."""
    rng = np.random.default_rng(seed)
    ids: list[str | None] = [""]
    for i, length in enumerate(rng.integers(1, 30, n)):
        points = rng.integers(1, 0x110000, length)
        ids.append(None if i % 10 == 0 else "".join(chr(p) for p in points if not 0xD800 <= p < 0xE000))
    return ids + ids[:100]


@pytest.mark.parametrize("n_buckets", [1, 7, 1024, 16384])
def test_bucket_hash_is_identical_in_python_duckdb_and_spark(spark, n_buckets) -> None:
    values = _random_ids(2_000)
    python = _python_hashes(values, n_buckets)
    assert _duckdb_hashes(values, n_buckets) == python
    assert _spark_hashes(spark, values, n_buckets) == python


# --- feature tables -------------------------------------------------------------------------------

def assert_same_table(duck: pa.Table, spark: pa.Table) -> None:
    """Equal column by column: names, order and Arrow types exactly; floats to REL, the rest exactly."""
    assert spark.schema.names == duck.schema.names
    assert [f.type for f in spark.schema] == [f.type for f in duck.schema]
    assert spark.num_rows == duck.num_rows
    for name in duck.column_names:
        expected, actual = duck.column(name).combine_chunks(), spark.column(name).combine_chunks()
        if pa.types.is_floating(expected.type):
            np.testing.assert_allclose(actual.to_numpy(zero_copy_only=False),
                                       expected.to_numpy(zero_copy_only=False), rtol=REL, atol=0, err_msg=name)
        else:  # ids, timestamps, integers, booleans and every sequence list: exactly
            assert actual.equals(expected), name


def _hand_made_events(path: Path) -> Path:
    """Ties in time broken by behaviour, item, category and amount (nulls last), null ids, a user
    with one event, events after the cutoff (labels), several behaviours at the same second."""
    rows = [
        ("a", "2024-01-01", "view", "i1", "c1", 0.0),
        ("a", "2024-01-10", "cart", "i1", "c1", 0.0),
        ("a", "2024-01-10", "cart", None, "c1", 0.0),
        ("a", "2024-01-10", "cart", "i0", None, 0.0),
        ("a", "2024-01-10", "buy", "i1", "c1", 12.5),
        ("a", "2024-01-10", "buy", "i1", "c1", 3.0),
        ("a", "2024-01-11", "buy", "i1", "c1", 30.0),
        ("a", "2024-01-28 10:00:00.123456", "view", "i2", "c2", 0.0),
        ("a", "2024-01-29", "buy", "i2", "c2", 10.0),
        ("a", "2024-02-05", "buy", "i3", "c2", 7.0),
        ("b", "2024-01-30", "view", "i9", None, 0.0),
        ("b", "2024-01-30", "fav", "i9", None, 0.0),
        ("c", "2024-02-02", "buy", "i1", "c1", 99.0),
        ("d", "2023-03-01", "fav", "ü-ñ", "ç", 0.0),
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "ts", "behavior", "item_id", "category_id", "amount"])
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601")
    frame["quantity"] = 1.0
    pq.write_table(pa.Table.from_pandas(frame[list(EVENTS_SCHEMA.names)], schema=EVENTS_SCHEMA,
                                        preserve_index=False), path)
    return path


@pytest.mark.parametrize("label_days", [None, 30])
def test_hand_made_log_with_ties_and_nulls(spark, tmp_path: Path, label_days: int | None) -> None:
    events = _hand_made_events(tmp_path / "events.parquet")
    spec = FeatureSpec(windows_days=(7, 30), sequence_length=4, category_buckets=7, item_buckets=11)
    cutoff = utc(2024, 1, 31)
    label_end = None if label_days is None else cutoff + dt.timedelta(days=label_days)
    duck = build_features(events, cutoff, spec, label_end=label_end)
    frame = spark_features(spark, register_spark_events(spark, events), cutoff, spec, label_end=label_end)
    assert_same_table(duck, feature_table(frame, spec, tmp_path / "spark", labels=label_end is not None))


# --- the featurize stage on both engines ------------------------------------------------------------

def _assert_same_feature_sets(events: Path, tmp_path: Path, spark) -> None:
    params = FeaturizeParams()
    duck_rows = write_feature_sets(events, SPLIT, params, DEFAULT_BEHAVIORS, tmp_path / "duckdb")
    spark_rows = write_feature_sets_spark(events, SPLIT, params, DEFAULT_BEHAVIORS, tmp_path / "spark",
                                          TEST_SPARK, spark=spark)
    assert spark_rows == duck_rows
    assert json.loads((tmp_path / "spark" / "meta.json").read_text()) == json.loads(
        (tmp_path / "duckdb" / "meta.json").read_text())
    assert sorted(p.name for p in (tmp_path / "spark").iterdir()) == sorted(
        p.name for p in (tmp_path / "duckdb").iterdir())
    for split, cutoffs in (("train", SPLIT.train_cutoffs_utc), ("eval", (SPLIT.eval_cutoff_utc,))):
        duck = pq.read_table(tmp_path / "duckdb" / f"{split}.parquet")
        spark_table = pq.read_table(tmp_path / "spark" / f"{split}.parquet")
        assert pq.read_schema(tmp_path / "spark" / f"{split}.parquet").equals(
            pq.read_schema(tmp_path / "duckdb" / f"{split}.parquet"))
        # Every cutoff of the split is there, with its labels; then every column is equal.
        assert set(spark_table.column("cutoff").to_pylist()) == set(cutoffs)
        assert_same_table(duck, spark_table)


@pytest.mark.slow
def test_cdnow_features_equal_on_both_engines(spark, cdnow_events: Path, tmp_path: Path) -> None:
    _assert_same_feature_sets(cdnow_events, tmp_path, spark)


@pytest.mark.slow
def test_synthetic_features_equal_on_both_engines(spark, small_synthetic: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    events = small_synthetic[0]
    behaviors = set(pq.read_table(events, columns=["behavior"]).column("behavior").to_pylist())
    assert behaviors == set(DEFAULT_BEHAVIORS)  # the log exercises every behaviour
    _assert_same_feature_sets(events, tmp_path, spark)

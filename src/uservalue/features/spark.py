"""The featurize stage on Spark (params `featurize.engine: spark`): the feature definition of
features.sql, rendered in its Spark SQL dialect, run on the session of params `spark`; the same
`{train,eval}.parquet` and `meta.json` as features.store writes with DuckDB, value for value.

Spark parallelises the heavy part (scanning the events, the per-user sort and aggregates); its
result, one row per user and cutoff, is then copied part file by part file, in order, into the one
Parquet file per split that later stages read, typed exactly as DuckDB types it (Spark has no
unsigned integers: the behaviour ids come back as int8 and are stored as uint8 like DuckDB's).
PySpark is an optional dependency (`pip install '.[spark]'`): it is imported only when used.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.config import FeaturizeParams, SparkParams, SplitParams
from uservalue.data.spark_session import copy_parts, data_spark_session, spark_scratch
from uservalue.duck import sql_string
from uservalue.features.sql import (
    SPARK,
    FeatureSpec,
    connect,
    feature_sets_sql,
    feature_sql,
    register_events,
)
from uservalue.features.store import feature_meta, label_windows, write_meta
from uservalue.io import atomic_dir
from uservalue.schema import EVENTS_SCHEMA

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

EVENTS_VIEW = "events"
NEVER_NULL = ("user_id", "cutoff", "label_days")  # the group key (of a NOT NULL column) and constants


def spark_session(params: SparkParams, app_name: str = "uservalue") -> SparkSession:
    """The Spark session of params `spark` (an existing one in this process is reused, reconfigured):
    the data stages' session (uservalue.data.spark_session), one definition for every stage."""
    return data_spark_session(params, app_name, "featurize.engine")


def register_spark_events(spark: SparkSession, events: str | Path) -> str:
    """The canonical events Parquet (file or folder, any Hadoop path) as the temp view `events`."""
    spark.read.parquet(str(events)).createOrReplaceTempView(EVENTS_VIEW)
    return EVENTS_VIEW


def spark_features(
    spark: SparkSession,
    source: str,
    cutoff: dt.datetime,
    spec: FeatureSpec = FeatureSpec(),
    *,
    label_end: dt.datetime | None = None,
) -> DataFrame:
    """build_features on Spark, lazily: the feature rows at `cutoff` over the view `source`, sorted by user.
    Column types are Spark's (seq_behavior int8); feature_table gives DuckDB's Arrow types."""
    return spark.sql(f"{feature_sql(source, cutoff, spec, label_end, SPARK)} ORDER BY user_id")


def split_frame(spark: SparkSession, source: str, windows: list[tuple[dt.datetime, dt.datetime]],
                spec: FeatureSpec) -> DataFrame:
    """One split's rows as the featurize stage writes them (features, labels, label_days; by cutoff, user)."""
    return spark.sql(feature_sets_sql(source, windows, spec, SPARK))


def duckdb_schema(spec: FeatureSpec, labels: bool = False, label_days: bool = False,
                  parquet: bool = True) -> pa.Schema:
    """The Arrow schema of the featurize stage's Parquet as DuckDB writes it: read from a file DuckDB
    writes from the same SQL over no events, so the two engines' files cannot drift apart in their
    types (nullability: see the end). `labels`: with the label columns; `label_days`: as the
    featurize stage writes them; `parquet` False: the schema of DuckDB's Arrow result instead
    (build_features': its cutoff carries the session's time zone name)."""
    con = connect()
    try:
        with tempfile.TemporaryDirectory() as folder:
            events, target = Path(folder) / "events.parquet", Path(folder) / "empty.parquet"
            pq.write_table(EVENTS_SCHEMA.empty_table(), events)
            source = register_events(con, events)
            cutoff = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
            end = cutoff + dt.timedelta(days=1)
            sql = (feature_sets_sql(source, [(cutoff, end)], spec) if label_days
                   else feature_sql(source, cutoff, spec, end if labels else None))
            if not parquet:
                return con.sql(sql).to_arrow_reader().schema
            con.execute(f"COPY ({sql}) TO {sql_string(str(target))} (FORMAT PARQUET)")
            schema = pq.read_schema(target)
    finally:
        con.close()
    # DuckDB marks a column REQUIRED from what it knows of the data (over the canonical events, which
    # has user_id NOT NULL: user_id, cutoff and label_days), not from the SQL alone; these columns
    # are never null by construction, so they are REQUIRED here as in its files of real logs.
    return pa.schema([f.with_nullable(False) if f.name in NEVER_NULL else f for f in schema])


def feature_table(frame: DataFrame, spec: FeatureSpec, scratch: Path, *, labels: bool = False) -> pa.Table:
    """spark_features' rows as the Arrow table build_features returns (DuckDB's types), through
    Parquet in `scratch` as in the stage. `labels`: the frame was built with a label_end."""
    target = scratch / "table.parquet"
    frame.write.mode("overwrite").parquet(str(scratch / "parts"))
    copy_parts(scratch / "parts", target, duckdb_schema(spec, labels=labels), store_schema=False)
    return pq.read_table(target).cast(duckdb_schema(spec, labels=labels, parquet=False))


def write_feature_sets_spark(
    events: str | Path,
    split: SplitParams,
    params: FeaturizeParams,
    behaviors: tuple[str, ...],
    out_dir: str | Path,
    spark_params: SparkParams = SparkParams(),
    spark: SparkSession | None = None,
) -> dict[str, int]:
    """features.store.write_feature_sets on Spark: the same files, swapped in atomically. Uses `spark`
    when given (tests), else opens the session of `spark_params` and stops it at the end."""
    spec = FeatureSpec.from_params(params, behaviors)
    windows = label_windows(split)
    own = spark is None
    session = spark_session(spark_params, "uservalue-featurize") if own else spark
    rows: dict[str, int] = {}
    try:
        source = register_spark_events(session, events)
        schema = duckdb_schema(spec, labels=True, label_days=True)
        with atomic_dir(out_dir) as tmp, spark_scratch(Path(out_dir).resolve().parent) as scratch:
            for name, cutoffs in windows.items():
                if not cutoffs:
                    continue
                parts = scratch / name
                split_frame(session, source, cutoffs, spec).write.mode("overwrite").parquet(str(parts))
                rows[name] = copy_parts(parts, tmp / f"{name}.parquet", schema, store_schema=False)
            write_meta(tmp, feature_meta(spec, split.horizon_days, windows, rows))
    finally:
        if own:
            session.stop()
    return rows

"""The one feature definition: per-user aggregates and last-L behaviour sequences from events < T,
labels from [T, T + horizon); one SQL statement for training, scoring and the service, run by DuckDB
(and by Spark SQL through the small `Dialect` layer below: features.spark)."""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from uservalue import duck
from uservalue.config import FeaturizeParams
from uservalue.duck import sql_string
from uservalue.features import buckets
from uservalue.schema import DEFAULT_BEHAVIORS, PURCHASE, RETURN

# build_features reads DuckDB's result as an Arrow stream on purpose (see there); the "extra copy"
# DuckDB warns about measured nothing on 10^5 users (8.5 s vs 8.9 s with the relation API).
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning,
                        module="uservalue.features.sql")

SECONDS_PER_DAY = 86_400.0
SEQUENCE_COLUMNS = (
    "seq_behavior",  # behaviour id, 1..len(vocabulary); 0 is left for padding
    "seq_category",  # hashed category bucket, 1..category_buckets; 0 = none/padding
    "seq_item",  # hashed item bucket, 1..item_buckets; 0 = none/padding
    "seq_log_age_days",  # ln(1 + days from the event to T)
    "seq_log_gap_days",  # ln(1 + days since the user's previous event)
    "seq_log_amount",  # ln(1 + amount)
)
# value: net spend in the horizon (purchases minus returns, floored at 0; a log without returns: its
# purchases); n_purchases: purchase events in the horizon; bought: n_purchases > 0.
LABEL_COLUMNS = ("value", "n_purchases", "bought")


@dataclass(frozen=True)
class FeatureSpec:
    """Everything the SQL depends on besides the data (hashable, so it can name a cache)."""

    behaviors: tuple[str, ...] = DEFAULT_BEHAVIORS
    windows_days: tuple[int, ...] = (7, 30, 90, 365)
    sequence_length: int = 50
    category_buckets: int = 1024
    item_buckets: int = 16384
    # Per-user text columns joined after the SQL (uservalue.text.features; issue 23): models read them as
    # aggregates. Empty unless the featurize stage joined item-text vectors (a log with item text).
    text_columns: tuple[str, ...] = ()
    # sha256 of the item vectors file those columns come from: a model scores with exactly the vectors it was
    # trained with (it saves a copy; uservalue.text.online), never a later embed_items run's.
    text_vectors: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FeatureSpec:
        """The spec as saved in JSON (lists back to tuples)."""
        return cls(**{**raw, "behaviors": tuple(raw["behaviors"]), "windows_days": tuple(raw["windows_days"]),
                      "text_columns": tuple(raw.get("text_columns", ()))})

    @classmethod
    def from_params(cls, params: FeaturizeParams, behaviors: tuple[str, ...]) -> FeatureSpec:
        return cls(
            behaviors=tuple(behaviors),
            windows_days=tuple(params.windows_days),
            sequence_length=params.sequence_length,
            category_buckets=params.category_buckets,
            item_buckets=params.item_buckets,
        )

    @property
    def returns(self) -> bool:
        """The log can hold returns ('return' is one of its behaviours): the features gain the money
        returned per window and the labels are net of returns. Without it, no return column exists."""
        return RETURN in self.behaviors

    def aggregate_columns(self) -> list[str]:
        columns = ["n_events", "recency_days", "tenure_days", "active_days", "mean_gap_days",
                   "n_categories", "n_items"]
        for b in self.behaviors:
            columns += [f"{b}_count", *(f"{b}_count_{w}d" for w in self.windows_days),
                        f"{b}_recency_days"]
        columns += ["monetary_sum", "monetary_mean", "monetary_max",
                    *(f"monetary_sum_{w}d" for w in self.windows_days)]
        if self.returns:  # return_count, return_count_{w}d and return_recency_days come with the behaviours
            columns += ["return_amount_sum", *(f"return_amount_sum_{w}d" for w in self.windows_days)]
        columns += ["purchase_days", "btyd_frequency", "btyd_recency_days", "btyd_age_days"]
        return columns + list(self.text_columns)


def _epoch(cutoff: dt.datetime) -> float:
    if cutoff.tzinfo is None:
        raise ValueError("cutoffs must be timezone-aware (UTC)")
    return cutoff.timestamp()


@dataclass(frozen=True)
class Dialect:
    """The few places where DuckDB SQL and Spark SQL differ. Everything else in feature_sql is written
    once, in SQL both engines parse alike: CAST(...), FILTER (WHERE ...), IS DISTINCT FROM, named
    windows and an explicit NULLS LAST (Spark sorts nulls first by default, DuckDB last)."""

    name: str
    epoch: Callable[[str], str]  # epoch seconds (DOUBLE) of a TIMESTAMPTZ column, bit for bit DuckDB's
    number: Callable[[float], str]  # a DOUBLE literal (Spark reads a bare 1.5 as a DECIMAL)
    timestamp_micros: Callable[[int], str]  # TIMESTAMPTZ from epoch microseconds
    bucket: Callable[[str, int], str]  # features.buckets: the same hash in every engine
    # The ordered list aggregate: a list of structs (name, expression) ordered by an integer key.
    # Spark has no ORDER BY inside aggregates: it sorts collected structs that lead with the key.
    ordered_structs: Callable[[list[tuple[str, str]], str], str]
    field_list: Callable[[str, str], str]  # the list of one field of each struct of a list column
    materialized: str  # CTE hint: DuckDB computes the shared sort once; Spark has no such keyword
    uint8: str  # SQL type stored as Arrow uint8 (Spark has no unsigned types: cast on the way out)


def _duckdb_structs(fields: list[tuple[str, str]], key: str) -> str:
    return "list({" + ", ".join(f"'{name}': {expr}" for name, expr in fields) + f"}} ORDER BY {key})"


def _spark_structs(fields: list[tuple[str, str]], key: str) -> str:
    # sort_array orders structs field by field: the unique key first makes it the order.
    pairs = ", ".join(f"'{name}', {expr}" for name, expr in fields)
    return f"sort_array(collect_list(named_struct('order_key', {key}, {pairs})))"


def _spark_epoch(column: str) -> str:
    # DuckDB's epoch(ts) is whole milliseconds / 1e3 + the remaining microseconds / 1e6 (measured
    # bit for bit; not micros / 1e6): the same two correctly rounded divisions in Spark, floored.
    micros = f"unix_micros({column})"
    return (f"(CAST(({micros} - pmod({micros}, 1000)) div 1000 AS DOUBLE) / 1000.0D "
            f"+ CAST(pmod({micros}, 1000) AS DOUBLE) / 1000000.0D)")


def _spark_number(value: float) -> str:
    text = repr(float(value))
    return f"{text}D" if text.replace(".", "").lstrip("-").isdigit() else f"CAST('{text}' AS DOUBLE)"


DUCKDB = Dialect(
    name="duckdb",
    epoch=lambda column: f"epoch({column})",
    number=lambda value: repr(float(value)),
    timestamp_micros=lambda micros: f"make_timestamptz({micros})",
    bucket=buckets.duckdb_bucket_sql,
    ordered_structs=_duckdb_structs,
    field_list=lambda column, field: f"list_transform({column}, lambda e: e.{field})",
    materialized="MATERIALIZED ",
    uint8="UTINYINT",
)
SPARK = Dialect(
    name="spark",
    epoch=_spark_epoch,
    number=_spark_number,
    timestamp_micros=lambda micros: f"timestamp_micros({micros})",
    bucket=buckets.spark_bucket_sql,
    ordered_structs=_spark_structs,
    field_list=lambda column, field: f"transform({column}, e -> e.{field})",
    materialized="",
    uint8="TINYINT",
)


def feature_sql(
    source: str,
    cutoff: dt.datetime,
    spec: FeatureSpec,
    label_end: dt.datetime | None = None,
    dialect: Dialect = DUCKDB,
) -> str:
    """SQL for the feature rows at `cutoff` over the relation `source` (canonical events).

    Labels are added when `label_end` is given: value (net spend: purchases minus returns, floored at 0)
    and purchases in [cutoff, label_end).
    The population is every user with at least one event before the cutoff. `dialect` picks the
    engine (DuckDB, or Spark SQL for features.spark); the definition itself is this one text.
    """
    T = _epoch(cutoff)
    num = dialect.number
    day = num(SECONDS_PER_DAY)
    buy = sql_string(PURCHASE)
    per_behavior = []
    for b in spec.behaviors:
        is_b = f"behavior = {sql_string(b)}"
        per_behavior.append(f"count(*) FILTER (WHERE {is_b}) AS {b}_count")
        for w in spec.windows_days:
            per_behavior.append(
                f"count(*) FILTER (WHERE {is_b} AND t >= {num(T - w * SECONDS_PER_DAY)}) AS {b}_count_{w}d")
        # Never seen: as old as the user's whole history (keeps the column numeric and monotone).
        per_behavior.append(
            f"coalesce(({num(T)} - max(t) FILTER (WHERE {is_b})) / {day}, ({num(T)} - min(t)) / {day}) "
            f"AS {b}_recency_days"
        )
    monetary_windows = [
        f"coalesce(sum(amount) FILTER (WHERE behavior = {buy} AND t >= {num(T - w * SECONDS_PER_DAY)}), 0) "
        f"AS monetary_sum_{w}d"
        for w in spec.windows_days
    ]
    if spec.returns:
        ret = sql_string(RETURN)
        monetary_windows += [
            f"coalesce(sum(amount) FILTER (WHERE behavior = {ret}), 0) AS return_amount_sum",
            *(f"coalesce(sum(amount) FILTER (WHERE behavior = {ret} AND t >= {num(T - w * SECONDS_PER_DAY)}), 0) "
              f"AS return_amount_sum_{w}d" for w in spec.windows_days),
        ]
    behavior_id = "CASE behavior " + " ".join(
        f"WHEN {sql_string(b)} THEN {i}" for i, b in enumerate(spec.behaviors, start=1)
    ) + " ELSE 0 END"
    L = spec.sequence_length
    sequence_fields = [
        ("behavior", f"CAST(({behavior_id}) AS {dialect.uint8})"),
        ("category", f"CAST({dialect.bucket('category_id', spec.category_buckets)} AS INTEGER)"),
        ("item", f"CAST({dialect.bucket('item_id', spec.item_buckets)} AS INTEGER)"),
        ("log_age_days", f"CAST(ln(1 + ({num(T)} - t) / {day}) AS FLOAT)"),
        ("log_gap_days", f"CAST(ln(1 + coalesce(gap, 0) / {day}) AS FLOAT)"),
        ("log_amount", "CAST(ln(1 + amount) AS FLOAT)"),
    ]
    labels_cte = labels_join = labels_select = ""
    if label_end is not None:
        E = _epoch(label_end)
        in_horizon = f"{dialect.epoch('ts')} >= {num(T)} AND {dialect.epoch('ts')} < {num(E)}"
        if spec.returns:  # net spend: what was bought minus what was given back, never below 0
            ret = sql_string(RETURN)
            labels_cte = f""",
        labels AS (
            SELECT user_id,
                   greatest(coalesce(sum(amount) FILTER (WHERE behavior = {buy}), 0)
                            - coalesce(sum(amount) FILTER (WHERE behavior = {ret}), 0), {num(0.0)}) AS value,
                   count(*) FILTER (WHERE behavior = {buy}) AS n_purchases
            FROM {source}
            WHERE behavior IN ({buy}, {ret}) AND {in_horizon}
            GROUP BY user_id
        )"""
        else:
            labels_cte = f""",
        labels AS (
            SELECT user_id, sum(amount) AS value, count(*) AS n_purchases
            FROM {source}
            WHERE behavior = {buy} AND {in_horizon}
            GROUP BY user_id
        )"""
        labels_join = "LEFT JOIN labels USING (user_id)"
        labels_select = """,
            CAST(coalesce(labels.value, 0) AS DOUBLE) AS value,
            CAST(coalesce(labels.n_purchases, 0) AS INTEGER) AS n_purchases,
            coalesce(labels.n_purchases, 0) > 0 AS bought"""
    return f"""
        WITH ev AS (
            SELECT user_id, {dialect.epoch('ts')} AS t, behavior, item_id, category_id, amount
            FROM {source}
            WHERE {dialect.epoch('ts')} < {num(T)}
        ),
        -- One sort of each user's history serves the sequences, gaps and active days.
        numbered AS {dialect.materialized}(
            SELECT
                user_id, t, behavior, item_id, category_id, amount,
                t - lag(t) OVER w AS gap,
                floor(t / {day}) IS DISTINCT FROM floor(lag(t) OVER w / {day}) AS new_day,
                row_number() OVER w AS k,
                count(*) OVER (PARTITION BY user_id) AS n
            FROM ev
            WINDOW w AS (PARTITION BY user_id ORDER BY t, behavior NULLS LAST, item_id NULLS LAST,
                         category_id NULLS LAST, amount NULLS LAST)
        ),
        -- Distinct counts as DISTINCT subqueries: much cheaper than count(DISTINCT) per group.
        diversity AS (
            SELECT user_id, CAST(count(category_id) AS INTEGER) AS n_categories,
                   CAST(count(item_id) AS INTEGER) AS n_items
            FROM (
                SELECT user_id, category_id, NULL AS item_id FROM (SELECT DISTINCT user_id, category_id FROM ev)
                UNION ALL
                SELECT user_id, NULL, item_id FROM (SELECT DISTINCT user_id, item_id FROM ev)
            )
            GROUP BY user_id
        ),
        totals AS (
            SELECT
                user_id,
                CAST(count(*) AS INTEGER) AS n_events,
                ({num(T)} - max(t)) / {day} AS recency_days,
                ({num(T)} - min(t)) / {day} AS tenure_days,
                CAST(count(*) FILTER (WHERE new_day) AS INTEGER) AS active_days,
                CASE WHEN count(*) > 1 THEN (max(t) - min(t)) / {day} / (count(*) - 1)
                     ELSE ({num(T)} - min(t)) / {day} END AS mean_gap_days,
                {", ".join(per_behavior)},
                coalesce(sum(amount) FILTER (WHERE behavior = {buy}), 0) AS monetary_sum,
                coalesce(avg(amount) FILTER (WHERE behavior = {buy}), 0) AS monetary_mean,
                coalesce(max(amount) FILTER (WHERE behavior = {buy}), 0) AS monetary_max,
                {", ".join(monetary_windows)},
                CAST(count(DISTINCT floor(t / {day})) FILTER (WHERE behavior = {buy}) AS INTEGER) AS purchase_days,
                CAST(greatest(count(DISTINCT floor(t / {day})) FILTER (WHERE behavior = {buy}) - 1, 0) AS INTEGER)
                    AS btyd_frequency,
                coalesce((max(t) FILTER (WHERE behavior = {buy}) - min(t) FILTER (WHERE behavior = {buy}))
                    / {day}, 0) AS btyd_recency_days,
                coalesce(({num(T)} - min(t) FILTER (WHERE behavior = {buy})) / {day}, 0) AS btyd_age_days
            FROM numbered
            GROUP BY user_id
        ),
        aggregates AS (
            SELECT * FROM totals JOIN diversity USING (user_id)
        ),
        -- One ordered aggregate of structs, unpacked below: a single sort instead of one per list.
        sequence_events AS (
            SELECT user_id, {dialect.ordered_structs(sequence_fields, 'k')} AS last_events
            FROM numbered
            WHERE k > n - {L}
            GROUP BY user_id
        ),
        sequences AS (
            SELECT
                user_id,
                {", ".join(f"{dialect.field_list('last_events', c.removeprefix('seq_'))} AS {c}" for c in SEQUENCE_COLUMNS)}
            FROM sequence_events
        ){labels_cte}
        SELECT
            aggregates.user_id,
            {dialect.timestamp_micros(int(T * 1_000_000))} AS cutoff,
            {", ".join(f"aggregates.{c}" for c in spec.aggregate_columns())},
            {", ".join(f"sequences.{c}" for c in SEQUENCE_COLUMNS)}{labels_select}
        FROM aggregates
        JOIN sequences USING (user_id)
        {labels_join}
    """


def feature_sets_sql(
    source: str,
    windows: list[tuple[dt.datetime, dt.datetime]],
    spec: FeatureSpec,
    dialect: Dialect = DUCKDB,
) -> str:
    """One split's rows: the features and labels at each (cutoff, label end), with `label_days`
    (the label window's length), sorted by cutoff then user: what the featurize stage writes."""
    parts = [
        f"SELECT *, CAST({dialect.number((end - cutoff).total_seconds() / SECONDS_PER_DAY)} AS DOUBLE) "
        f"AS label_days FROM ({feature_sql(source, cutoff, spec, end, dialect)})"
        for cutoff, end in windows
    ]
    return f"{' UNION ALL '.join(parts)} ORDER BY cutoff, user_id"


def connect(params: FeaturizeParams | None = None) -> duckdb.DuckDBPyConnection:
    params = params or FeaturizeParams()
    return duck.connect(memory_limit=params.memory_limit, threads=params.threads)


def register_events(con: duckdb.DuckDBPyConnection, events: str | Path | pa.Table | pd.DataFrame) -> str:
    if isinstance(events, (str, Path)):
        con.execute(f"CREATE OR REPLACE TEMP VIEW events AS SELECT * FROM read_parquet({sql_string(str(events))})")
    else:
        con.register("events_input", events)
        con.execute("CREATE OR REPLACE TEMP VIEW events AS SELECT * FROM events_input")
    return "events"


def build_features(
    events: str | Path | pa.Table | pd.DataFrame,
    cutoff: dt.datetime,
    spec: FeatureSpec = FeatureSpec(),
    *,
    label_end: dt.datetime | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pa.Table:
    """Feature rows (one per user with history before `cutoff`), sorted by user_id."""
    own = con is None
    con = con or connect()
    try:
        source = register_events(con, events)
        # execute + reader: one plan (the relation API plans twice, ~10 ms per call that the
        # service pays on every request) and no extra copy of the rows.
        sql = f"{feature_sql(source, cutoff, spec, label_end)} ORDER BY user_id"
        return con.execute(sql).to_arrow_reader().read_all()
    finally:
        if own:
            con.close()

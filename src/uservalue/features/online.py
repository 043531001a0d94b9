"""The feature definition of features.sql computed in numpy over per-user event columns (no SQL planned
per request); equal to build_features, proven by tests/data/test_online_features.py (docs/online.md)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from uservalue import duck
from uservalue.features import buckets
from uservalue.features.sql import SECONDS_PER_DAY, SEQUENCE_COLUMNS, FeatureSpec, _epoch
from uservalue.schema import PURCHASE, RETURN

DAY = SECONDS_PER_DAY
DEFAULT_SPEC = FeatureSpec()


@dataclass(frozen=True)
class EventColumns:
    """Events of one or many users, columnar (numpy), any order; what the online store keeps per user."""

    user_id: np.ndarray  # object (str), per event
    t: np.ndarray  # float64: epoch seconds, exactly DuckDB's epoch(ts) of the canonical `ts`
    behavior: np.ndarray  # object (str)
    item_id: np.ndarray  # object (str or None)
    category_id: np.ndarray  # object (str or None)
    amount: np.ndarray  # float64
    item_hash: np.ndarray  # uint64: features.buckets' id_hash(item_id); 0 where item_id is null
    category_hash: np.ndarray  # uint64: features.buckets' id_hash(category_id); 0 where category_id is null

    def __len__(self) -> int:
        return len(self.t)

    def take(self, index: np.ndarray) -> EventColumns:
        """The events at `index` (positions or a boolean mask)."""
        return EventColumns(*(getattr(self, f.name)[index] for f in fields(self)))


_EVENT_COLUMNS_SQL = """
    SELECT
        user_id, epoch(ts)::DOUBLE AS t, behavior, item_id, category_id, amount::DOUBLE AS amount,
        CASE WHEN item_id IS NULL THEN 0 ELSE {item_hash} END AS item_hash,
        CASE WHEN category_id IS NULL THEN 0 ELSE {category_hash} END AS category_hash
    FROM {source}
"""


def event_columns(table: pa.Table | pd.DataFrame, con: duckdb.DuckDBPyConnection | None = None) -> EventColumns:
    """From the canonical events table (uservalue.schema.EVENTS_SCHEMA): `t` is DuckDB's own
    `epoch(ts)` and the two hashes the SQL's bucket hash (features.buckets), in one query."""
    own = con is None
    con = con or duck.connect()
    name = "online_event_columns_input"
    try:
        con.register(name, table)
        sql = _EVENT_COLUMNS_SQL.format(source=name, item_hash=buckets.duckdb_hash_sql("item_id"),
                                        category_hash=buckets.duckdb_hash_sql("category_id"))
        result = con.sql(sql).to_arrow_table()
    finally:
        con.unregister(name)
        if own:
            con.close()

    def column(c: str, dtype: type | None = None) -> np.ndarray:
        values = result.column(c).to_numpy(zero_copy_only=False)
        return values if dtype is None else values.astype(dtype, copy=False)

    return EventColumns(
        user_id=column("user_id", object),
        t=column("t", np.float64),
        behavior=column("behavior", object),
        item_id=column("item_id", object),
        category_id=column("category_id", object),
        amount=column("amount", np.float64),
        item_hash=column("item_hash", np.uint64),
        category_hash=column("category_hash", np.uint64),
    )


def epoch_seconds(micros: np.ndarray) -> np.ndarray:
    """DuckDB's `epoch(ts)::DOUBLE` of microsecond timestamps, bit for bit: it is the whole
    milliseconds / 1e3 plus the remaining microseconds / 1e6 (not micros / 1e6, which differs in
    the last bit for about one timestamp in eight)."""
    millis, micros_left = np.divmod(np.asarray(micros, dtype=np.int64), 1000)
    return millis / 1e3 + micros_left / 1e6


def events_to_columns(user_id: Sequence[str], ts_micros: Sequence[int], behavior: Sequence[str],
                      item_id: Sequence[str | None], category_id: Sequence[str | None],
                      amount: Sequence[float]) -> EventColumns:
    """event_columns of a few events given as values (a request's): the same numbers without a
    query (DuckDB's fixed cost per query is milliseconds), `t` computed as DuckDB's epoch() and the
    hashes by features.buckets in Python."""
    items = np.array(item_id, dtype=object)
    categories = np.array(category_id, dtype=object)
    return EventColumns(
        user_id=np.array(user_id, dtype=object),
        t=epoch_seconds(np.asarray(ts_micros, dtype=np.int64)),
        behavior=np.array(behavior, dtype=object),
        item_id=items,
        category_id=categories,
        amount=np.asarray(amount, dtype=np.float64),
        item_hash=buckets.hash_values(items),
        category_hash=buckets.hash_values(categories),
    )


def concat(parts: Sequence[EventColumns]) -> EventColumns:
    """One EventColumns holding every part's events."""
    if not parts:
        return EventColumns(*(np.empty(0, dtype=d) for d in _DTYPES))
    if len(parts) == 1:  # a lone request's events: no copy
        return parts[0]
    return EventColumns(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(EventColumns)))


_DTYPES = (object, np.float64, object, object, object, np.float64, np.uint64, np.uint64)


@functools.cache
def duckdb_timezone() -> str:
    """The TimeZone a default DuckDB session stamps on TIMESTAMPTZ results (read once per process)."""
    con = duck.connect()
    try:
        return str(con.execute("SELECT current_setting('TimeZone')").fetchone()[0])
    finally:
        con.close()


def _list_type(value: pa.DataType) -> pa.DataType:
    return pa.list_(pa.field("l", value))  # DuckDB names a list's child "l"


@functools.lru_cache(maxsize=64)
def output_schema(spec: FeatureSpec) -> pa.Schema:
    """The Arrow schema build_features returns for `spec` (without labels): count(*)::INTEGER is
    int32, a bare count(*) FILTER (...) int64, the rest double; sequences as DuckDB lists."""
    i32, i64, f64 = pa.int32(), pa.int64(), pa.float64()
    types = {"n_events": i32, "active_days": i32, "n_categories": i32, "n_items": i32,
             "purchase_days": i32, "btyd_frequency": i32}
    types.update((f"{b}_count", i64) for b in spec.behaviors)
    types.update((f"{b}_count_{w}d", i64) for b in spec.behaviors for w in spec.windows_days)
    element = (pa.uint8(), i32, i32, pa.float32(), pa.float32(), pa.float32())
    return pa.schema([
        pa.field("user_id", pa.string()),
        pa.field("cutoff", pa.timestamp("us", tz=duckdb_timezone())),
        *(pa.field(c, types.get(c, f64)) for c in spec.aggregate_columns()),
        *(pa.field(c, _list_type(e)) for c, e in zip(SEQUENCE_COLUMNS, element, strict=True)),
    ])


@functools.lru_cache(maxsize=64)
def _aggregate_blocks(spec: FeatureSpec) -> tuple[tuple[type, tuple[str, ...]], ...]:
    """The aggregate columns grouped by their numpy type."""
    schema = output_schema(spec)
    groups: dict[type, list[str]] = {}
    for c in spec.aggregate_columns():
        groups.setdefault(schema.field(c).type.to_pandas_dtype(), []).append(c)
    return tuple((dtype, tuple(names)) for dtype, names in groups.items())


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes in order of first appearance, -1 for null; the distinct values), like pd.factorize,
    whose fixed cost dominates on the few events of one user."""
    if len(values) > 1_000:
        codes, uniques = pd.factorize(values, sort=False)
        return codes.astype(np.int64, copy=False), np.asarray(uniques, dtype=object)
    index: dict = {}
    codes = np.fromiter((-1 if v is None or v != v else  # noqa: PLR0124 (v != v: NaN)
                          index.setdefault(v, len(index)) for v in values),
                        np.int64, len(values))
    return codes, np.array(list(index), dtype=object)


def _ranks(codes: np.ndarray, uniques: np.ndarray) -> np.ndarray:
    """The rank of each coded value among the distinct values that occur in `codes`, nulls (-1)
    after all (ORDER BY ... NULLS LAST). Python's str order is UTF-8 byte order, as DuckDB's."""
    present = np.unique(codes[codes >= 0])
    rank = np.empty(len(present) + 1, dtype=np.int64)
    rank[np.argsort(uniques[present], kind="stable")] = np.arange(len(present))
    rank[-1] = len(present)
    return rank[np.where(codes >= 0, np.searchsorted(present, codes), -1)]


@dataclass(frozen=True)
class _Coded:
    """The events before T as numbers: string columns factorized once, in input order."""

    t: np.ndarray
    amount: np.ndarray
    user: np.ndarray  # rank of user_id: output row order
    behavior: np.ndarray  # codes into behaviors
    behaviors: np.ndarray
    item: np.ndarray  # codes into items, -1 null
    items: np.ndarray
    category: np.ndarray
    categories: np.ndarray


def _window_order(ev: _Coded) -> np.ndarray:
    """Positions in the SQL's window order: user, t, behavior, item_id, category_id, amount, nulls
    last. Sorts by (user, t), then re-sorts only the runs where (user, t) repeats, on string ranks
    taken over those events alone."""
    n = len(ev.t)
    t_rank = np.empty(n, dtype=np.int64)
    t_rank[np.argsort(ev.t)] = np.arange(n)  # equal times get neighbouring ranks, any order
    order = np.argsort(ev.user * n + t_rank)  # one integer sort: much faster than lexsort
    u, t = ev.user[order], ev.t[order]
    tied = (u[1:] == u[:-1]) & (t[1:] == t[:-1])
    if not tied.any():
        return order
    involved = np.zeros(len(order), dtype=bool)
    involved[:-1] |= tied
    involved[1:] |= tied
    slots = np.flatnonzero(involved)  # whole runs of equal (user, t), each contiguous
    rows = order[slots]
    keys = (ev.amount[rows], _ranks(ev.category[rows], ev.categories), _ranks(ev.item[rows], ev.items),
            _ranks(ev.behavior[rows], ev.behaviors), ev.t[rows], ev.user[rows])
    order[slots] = rows[np.lexsort(keys)]
    return order


# A float64 whose low 29 mantissa bits lie this close to 2**28 sits next to a float32 rounding
# boundary: there a last-bit difference between numpy's log and the C library's could change the
# FLOAT DuckDB stores, so those few are taken with math.log (the libm log DuckDB's ln calls).
_F32_DROPPED_BITS = np.uint64((1 << 29) - 1)
_F32_HALF = np.uint64(1 << 28)
_NEAR = np.uint64(8)


def _log_f32(x: np.ndarray) -> np.ndarray:
    """ln(x)::FLOAT as DuckDB computes it: the double log, rounded to float32."""
    with np.errstate(divide="ignore", invalid="ignore"):  # DuckDB's ln: -inf at 0, NaN below, no error
        y = np.log(x)
    low = y.view(np.uint64) & _F32_DROPPED_BITS
    near = np.flatnonzero(((low - (_F32_HALF - _NEAR)) <= 2 * _NEAR) & (y > -np.inf) & (y < np.inf))
    if len(near):
        y[near] = [math.log(v) for v in x[near]]
    return y.astype(np.float32)


def _segment_first(user: np.ndarray, values: np.ndarray, n_users: int, last: bool) -> np.ndarray:
    """Per user, the first (or last) of `values` (grouped by `user`, in window order); NaN for none."""
    out = np.full(n_users, np.nan)
    if len(values):
        at = np.empty(len(user), dtype=bool)  # each user's first (last) element
        if last:
            np.not_equal(user[1:], user[:-1], out=at[:-1])
            at[-1] = True
        else:
            np.not_equal(user[1:], user[:-1], out=at[1:])
            at[0] = True
        out[user[at]] = values[at]
    return out


def _changes(user: np.ndarray, key: np.ndarray) -> np.ndarray:
    """True where (user, key) differs from the previous element (the first counts)."""
    new = np.ones(len(key), dtype=bool)
    new[1:] = (key[1:] != key[:-1]) | (user[1:] != user[:-1])
    return new


def _distinct_per_user(user: np.ndarray, codes: np.ndarray, n_users: int) -> np.ndarray:
    """count(DISTINCT value) per user of factorized values, nulls (-1) not counted."""
    present = codes >= 0
    base = int(codes.max()) + 1 if present.any() else 1
    pairs = np.sort(user[present] * base + codes[present])
    return np.bincount(pairs[_changes(pairs, pairs)] // base, minlength=n_users).astype(np.int32)


def _code(events: EventColumns, T: float) -> tuple[_Coded, np.ndarray, np.ndarray, np.ndarray] | None:
    """The events before T, factorized; with their item and category hashes and the sorted user ids."""
    before = events.t < T
    if not before.any():
        return None
    everything = bool(before.all())

    def pick(a: np.ndarray) -> np.ndarray:
        return a if everything else a[before]

    user_codes, user_ids = _factorize(pick(events.user_id))
    by_id = np.argsort(user_ids, kind="stable")
    user_rank = np.empty(len(user_ids), dtype=np.int64)
    user_rank[by_id] = np.arange(len(user_ids))
    behavior, behaviors = _factorize(pick(events.behavior))
    item, items = _factorize(pick(events.item_id))
    category, categories = _factorize(pick(events.category_id))
    coded = _Coded(pick(events.t), pick(events.amount), user_rank[user_codes], behavior, behaviors,
                   item, items, category, categories)
    return coded, pick(events.item_hash), pick(events.category_hash), user_ids[by_id]


def _bucket(hashes: np.ndarray, null: np.ndarray, buckets: int) -> np.ndarray:
    """CASE WHEN x IS NULL THEN 0 ELSE hash(x) % buckets + 1 END, as INTEGER."""
    return np.where(null, 0, hashes % np.uint64(buckets) + np.uint64(1)).astype(np.int32)


@dataclass(frozen=True)
class FeatureArrays:
    """online_features' rows as numpy arrays, before any Arrow or pandas: what the service hands to
    a model's fast path (ValueModel.predict_arrays). `to_arrow()` is exactly online_features."""

    spec: FeatureSpec
    user_id: np.ndarray  # object (str) [U]
    cutoff_us: np.ndarray  # int64 [U]: the cutoff, epoch microseconds
    aggregates: dict[str, np.ndarray]  # spec.aggregate_columns(), each [U] in output_schema's type
    offsets: np.ndarray  # int64 [U + 1]: row i's sequence elements are [offsets[i], offsets[i + 1])
    sequences: dict[str, np.ndarray]  # SEQUENCE_COLUMNS, each the flat elements in output_schema's type

    def __len__(self) -> int:
        return len(self.user_id)

    @property
    def lengths(self) -> np.ndarray:
        """Sequence elements per row (each row keeps at most spec.sequence_length)."""
        return np.diff(self.offsets)

    def matrix(self, columns: Sequence[str]) -> np.ndarray:
        """The named aggregate columns as one float64 [U, len(columns)] matrix (what the SQL's
        values become in a float64 DataFrame: integers exactly, floats as they are)."""
        out = np.empty((len(self), len(columns)), dtype=np.float64)
        for j, column in enumerate(columns):
            out[:, j] = self.aggregates[column]
        return out

    def with_user_ids(self, user_id: np.ndarray) -> FeatureArrays:
        return dataclasses.replace(self, user_id=user_id)

    def take(self, rows: np.ndarray) -> FeatureArrays:
        """The rows at `rows` (positions), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        elements = np.repeat(self.offsets[rows] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return FeatureArrays(self.spec, self.user_id[rows], self.cutoff_us[rows],
                             {c: v[rows] for c, v in self.aggregates.items()}, offsets,
                             {c: v[elements] for c, v in self.sequences.items()})

    @staticmethod
    def concat(parts: Sequence[FeatureArrays]) -> FeatureArrays:
        """The rows of every part, in order (all parts of one spec)."""
        if len(parts) == 1:
            return parts[0]
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        first = parts[0]
        return FeatureArrays(
            first.spec, np.concatenate([p.user_id for p in parts]), np.concatenate([p.cutoff_us for p in parts]),
            {c: np.concatenate([p.aggregates[c] for p in parts]) for c in first.aggregates}, offsets,
            {c: np.concatenate([p.sequences[c] for p in parts]) for c in first.sequences})

    def to_arrow(self) -> pa.Table:
        """The rows as build_features returns them (the same schema)."""
        schema = output_schema(self.spec)
        U = len(self)
        arrays = {"user_id": pa.array(self.user_id, pa.string()),
                  "cutoff": pa.array(self.cutoff_us, schema.field("cutoff").type)}
        # One array per numeric type, sliced into columns (cheaper than an array per column).
        for dtype, names in _aggregate_blocks(self.spec):
            block = pa.array(np.concatenate([np.asarray(self.aggregates[c], dtype=dtype) for c in names]))
            arrays.update((c, block.slice(j * U, U)) for j, c in enumerate(names))
        offsets_array = pa.array(self.offsets.astype(np.int32))
        arrays.update((c, pa.ListArray.from_arrays(offsets_array, pa.array(self.sequences[c]),
                                                   type=schema.field(c).type))
                      for c in SEQUENCE_COLUMNS)
        return pa.Table.from_arrays([arrays[c] for c in schema.names], schema=schema)

    def to_pandas(self) -> pd.DataFrame:
        """The rows as the batch path's DataFrame (build_features(...).to_pandas())."""
        return self.to_arrow().to_pandas()


def _empty_arrays(spec: FeatureSpec) -> FeatureArrays:
    schema = output_schema(spec)
    return FeatureArrays(
        spec, np.empty(0, dtype=object), np.empty(0, dtype=np.int64),
        {c: np.empty(0, dtype=schema.field(c).type.to_pandas_dtype()) for c in spec.aggregate_columns()},
        np.zeros(1, dtype=np.int64),
        {c: np.empty(0, dtype=schema.field(c).type.value_type.to_pandas_dtype()) for c in SEQUENCE_COLUMNS})


@dataclass(frozen=True)
class _SpecPlan:
    """What online_arrays derives from the spec alone (names, types, behaviour ids), once per spec."""

    columns: tuple[str, ...]  # spec.aggregate_columns()
    dtypes: dict[str, type]  # per aggregate column: its numpy type (output_schema's)
    behavior_ids: dict[str, int]  # 1..len(spec.behaviors)
    behavior_columns: tuple[str, ...]  # per behaviour, in spec order: <b>_count, <b>_count_<w>d..., <b>_recency_days
    monetary_windows: tuple[str, ...]  # monetary_sum_<w>d per window
    return_windows: tuple[str, ...]  # return_amount_sum_<w>d per window


@functools.lru_cache(maxsize=64)
def _spec_plan(spec: FeatureSpec) -> _SpecPlan:
    return _SpecPlan(
        columns=tuple(spec.aggregate_columns()),
        dtypes={c: dtype for dtype, names in _aggregate_blocks(spec) for c in names},
        behavior_ids={b: i for i, b in enumerate(spec.behaviors, start=1)},
        behavior_columns=tuple(c for b in spec.behaviors for c in (
            f"{b}_count", *(f"{b}_count_{w}d" for w in spec.windows_days), f"{b}_recency_days")),
        monetary_windows=tuple(f"monetary_sum_{w}d" for w in spec.windows_days),
        return_windows=tuple(f"return_amount_sum_{w}d" for w in spec.windows_days),
    )


def online_features(events: EventColumns, as_of: dt.datetime, spec: FeatureSpec = DEFAULT_SPEC) -> pa.Table:
    """Exactly build_features(<events as a table>, as_of, spec): one row per user with an event
    before `as_of`, sorted by user_id, the same columns and Arrow types."""
    return online_arrays(events, as_of, spec).to_arrow()


def online_arrays(events: EventColumns, as_of: dt.datetime, spec: FeatureSpec = DEFAULT_SPEC) -> FeatureArrays:
    """online_features' rows as numpy arrays (FeatureArrays), without building the Arrow table."""
    T = _epoch(as_of)
    coded = _code(events, T)
    if coded is None:
        return _empty_arrays(spec)
    ev, item_hash, category_hash, users = coded
    plan = _spec_plan(spec)
    order = _window_order(ev)
    u, t, amount = ev.user[order], ev.t[order], ev.amount[order]
    n, U = len(t), len(users)
    starts = np.flatnonzero(_changes(u, u))
    ends = np.empty_like(starts)  # one past each user's last event
    ends[:-1] = starts[1:]
    ends[-1] = n
    n_events = ends - starts
    t_min, t_max = t[starts], t[ends - 1]  # sorted by t within a user
    tenure = (T - t_min) / DAY
    day = np.floor(t / DAY)

    cols: dict[str, np.ndarray] = {
        "n_events": n_events.astype(np.int32),
        "recency_days": (T - t_max) / DAY,
        "tenure_days": tenure,
        "active_days": np.bincount(u[_changes(u, day)], minlength=U).astype(np.int32),
        "mean_gap_days": np.where(n_events > 1, (t_max - t_min) / DAY / np.maximum(n_events - 1, 1), tenure),
        "n_categories": _distinct_per_user(ev.user, ev.category, U),
        "n_items": _distinct_per_user(ev.user, ev.item, U),
    }

    # Behaviour ids (1..len(spec.behaviors), 0 for any other), looked up once per distinct string.
    behavior_id = np.array([plan.behavior_ids.get(b, 0) for b in ev.behaviors], dtype=np.int64)[ev.behavior[order]]
    is_buy = np.array([b == PURCHASE for b in ev.behaviors], dtype=bool)[ev.behavior[order]]
    K, W = len(spec.behaviors) + 1, len(spec.windows_days)
    # Per (behaviour, user) cell and per (window, behaviour, user) cell: one bincount each for all of them.
    key = behavior_id * U + u
    in_window = t >= np.array([T - w * DAY for w in spec.windows_days])[:, None]  # [window, event]
    window_base = np.arange(W, dtype=np.int64)[:, None]
    counts = np.bincount(key, minlength=K * U).reshape(K, U)
    window_counts = np.bincount((window_base * (K * U) + key)[in_window], minlength=W * K * U).reshape(W, K, U)
    last_t = np.full(K * U, -np.inf)
    np.maximum.at(last_t, key, t)
    last_t = last_t.reshape(K, U)[1:]
    seen = last_t > -np.inf
    recency = np.where(seen, (T - np.where(seen, last_t, T)) / DAY, tenure)  # [behaviour, user]
    per_behavior = [a for i in range(1, K) for a in (counts[i], *window_counts[:, i], recency[i - 1])]
    cols.update(zip(plan.behavior_columns, per_behavior, strict=True))

    ub, buy_t, buy_amount = u[is_buy], t[is_buy], amount[is_buy]
    n_buys = np.bincount(ub, minlength=U)
    bought = n_buys > 0
    spend = np.bincount(ub, weights=buy_amount, minlength=U)
    top = np.full(U, -np.inf)
    np.maximum.at(top, ub, buy_amount)
    cols["monetary_sum"] = spend
    cols["monetary_mean"] = np.where(bought, spend / np.maximum(n_buys, 1), 0.0)
    cols["monetary_max"] = np.where(bought, top, 0.0)
    # Each (window, user) bin sums its amounts in event order, as one bincount per window would.
    windowed = in_window[:, is_buy]
    sums = np.bincount((window_base * U + ub)[windowed], weights=np.broadcast_to(buy_amount, windowed.shape)[windowed],
                       minlength=W * U).reshape(W, U)
    cols.update(zip(plan.monetary_windows, sums, strict=True))
    if spec.returns:  # the money given back, as features.sql's return_amount_sum columns
        is_return = np.array([b == RETURN for b in ev.behaviors], dtype=bool)[ev.behavior[order]]
        ur, return_amount = u[is_return], amount[is_return]
        cols["return_amount_sum"] = np.bincount(ur, weights=return_amount, minlength=U)
        windowed = in_window[:, is_return]
        sums = np.bincount((window_base * U + ur)[windowed],
                           weights=np.broadcast_to(return_amount, windowed.shape)[windowed],
                           minlength=W * U).reshape(W, U)
        cols.update(zip(plan.return_windows, sums, strict=True))
    purchase_days = np.bincount(ub[_changes(ub, day[is_buy])], minlength=U).astype(np.int32)
    first_buy = _segment_first(ub, buy_t, U, last=False)
    last_buy = _segment_first(ub, buy_t, U, last=True)
    cols["purchase_days"] = purchase_days
    cols["btyd_frequency"] = np.maximum(purchase_days - 1, 0).astype(np.int32)
    cols["btyd_recency_days"] = np.where(bought, (last_buy - first_buy) / DAY, 0.0)
    cols["btyd_age_days"] = np.where(bought, (T - first_buy) / DAY, 0.0)

    # Sequences: the last L events of each user in window order; gaps over the whole history.
    L = spec.sequence_length
    keep = np.repeat(ends, n_events) - np.arange(n) <= L  # among its user's last L events
    offsets = np.zeros(U + 1, dtype=np.int64)
    np.cumsum(np.minimum(n_events, L), out=offsets[1:])
    gap = np.zeros(n)
    gap[1:] = t[1:] - t[:-1]
    gap[starts] = 0.0
    kept = order[keep]
    m = len(kept)
    # The three logs in one call (each element's float32 is the same whatever array it is in: _log_f32).
    logs = _log_f32(np.concatenate([1 + (T - t[keep]) / DAY, 1 + gap[keep] / DAY, 1 + amount[keep]]))
    sequences = {
        "seq_behavior": behavior_id[keep].astype(np.uint8),
        "seq_category": _bucket(category_hash[kept], ev.category[kept] < 0, spec.category_buckets),
        "seq_item": _bucket(item_hash[kept], ev.item[kept] < 0, spec.item_buckets),
        "seq_log_age_days": logs[:m],
        "seq_log_gap_days": logs[m:2 * m],
        "seq_log_amount": logs[2 * m:],
    }
    if spec.text_columns:  # the pooled item-text vectors, as the batch join (issue 23; uservalue.text.online)
        from uservalue.text.online import pooled_text_columns

        cols.update(pooled_text_columns(spec.text_columns, events, T, users, spec.text_vectors))

    dtypes = plan.dtypes
    return FeatureArrays(spec, users, np.full(U, int(T * 1_000_000), dtype=np.int64),
                         {c: np.asarray(cols[c], dtype=dtypes[c]) for c in plan.columns},
                         offsets, sequences)

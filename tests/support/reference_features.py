"""A plain pandas implementation of the feature rows defined in `uservalue.features.sql.feature_sql`.

This module is the *independent reference* for the DuckDB definition: the tests build features
with both and require them to agree, and the featurize benchmark (`bench/featurize.py`) uses it as
the baseline. It is not used by the pipeline; `uservalue.features.sql` stays the one definition that
training, evaluation and serving share.

It is written to be read next to the SQL, one pandas step per SQL clause:

- ``WHERE epoch(ts) < T``                -> ``history = events[t < T]``
- ``agg(...) FILTER (WHERE cond)``       -> a helper column that is the value where ``cond`` holds
  and NaN/False elsewhere, then one ``groupby("user_id").agg(...)`` over all of them
- ``row_number() / lag() OVER (PARTITION BY user_id ORDER BY ...)`` -> ``sort_values`` on the same
  keys, ``groupby().diff()`` and ``groupby().tail(L)``
- ``list(... ORDER BY k)``               -> ``groupby().agg(list)``

Covered: every aggregate column, the labels and the sequence lists except ``seq_category`` and
``seq_item``. Those two are hashed buckets, ``hash(id) % buckets + 1``, and DuckDB's ``hash()`` is
an internal function with no documented, stable definition to reimplement in Python; a reference
that copied its bits would not be independent of it. Their ordering and truncation are the same
as the other sequence lists, which are checked.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from uservalue.features.sql import LABEL_COLUMNS, SECONDS_PER_DAY, FeatureSpec
from uservalue.schema import PURCHASE, RETURN

DAY = SECONDS_PER_DAY
# The sequence columns this reference reproduces (the hashed bucket columns are left out).
REFERENCE_SEQUENCE_COLUMNS = (
    "seq_behavior", "seq_log_age_days", "seq_log_gap_days", "seq_log_amount"
)
# Same ordering as the SQL window: ORDER BY t, behavior, item_id, category_id, amount (NULLS LAST).
SEQUENCE_ORDER = ["t", "behavior", "item_id", "category_id", "amount"]


def _epoch_seconds(ts: pd.Series) -> pd.Series:
    """Seconds since 1970 as float64, like DuckDB's epoch(ts): microseconds / 1e6."""
    ts = pd.to_datetime(ts, utc=True)
    return ts.astype("datetime64[us, UTC]").astype("int64") / 1_000_000


def _epoch(cutoff: dt.datetime) -> float:
    if cutoff.tzinfo is None:
        raise ValueError("cutoffs must be timezone-aware (UTC)")
    return cutoff.timestamp()


def _aggregates(history: pd.DataFrame, T: float, spec: FeatureSpec) -> pd.DataFrame:
    """One row per user: the `aggregates` CTE."""
    t = history["t"]
    day = np.floor(t / DAY)
    is_buy = history["behavior"] == PURCHASE

    # Helper columns: a FILTER (WHERE ...) clause becomes "the value where the condition holds".
    helpers: dict[str, pd.Series] = {
        "day": day,
        "buy_day": day.where(is_buy),
        "buy_t": t.where(is_buy),
        "buy_amount": history["amount"].where(is_buy),
    }
    for b in spec.behaviors:
        is_b = history["behavior"] == b
        helpers[f"is_{b}"] = is_b
        helpers[f"{b}_t"] = t.where(is_b)
        for w in spec.windows_days:
            helpers[f"is_{b}_{w}d"] = is_b & (t >= T - w * DAY)
    for w in spec.windows_days:
        helpers[f"buy_amount_{w}d"] = history["amount"].where(is_buy & (t >= T - w * DAY))
    is_return = history["behavior"] == RETURN
    if spec.returns:
        helpers["return_amount"] = history["amount"].where(is_return)
        for w in spec.windows_days:
            helpers[f"return_amount_{w}d"] = history["amount"].where(is_return & (t >= T - w * DAY))
    frame = history.assign(**helpers)

    named: dict[str, tuple[str, str]] = {
        "n_events": ("t", "size"),
        "t_min": ("t", "min"),
        "t_max": ("t", "max"),
        "active_days": ("day", "nunique"),
        "n_categories": ("category_id", "nunique"),
        "n_items": ("item_id", "nunique"),
        "monetary_sum": ("buy_amount", "sum"),  # sum of nothing = 0, like coalesce(sum, 0)
        "monetary_mean": ("buy_amount", "mean"),
        "monetary_max": ("buy_amount", "max"),
        "purchase_days": ("buy_day", "nunique"),
        "buy_t_min": ("buy_t", "min"),
        "buy_t_max": ("buy_t", "max"),
    }
    for b in spec.behaviors:
        named[f"{b}_count"] = (f"is_{b}", "sum")
        named[f"{b}_t_max"] = (f"{b}_t", "max")
        for w in spec.windows_days:
            named[f"{b}_count_{w}d"] = (f"is_{b}_{w}d", "sum")
    for w in spec.windows_days:
        named[f"monetary_sum_{w}d"] = (f"buy_amount_{w}d", "sum")
    if spec.returns:
        named["return_amount_sum"] = ("return_amount", "sum")
        for w in spec.windows_days:
            named[f"return_amount_sum_{w}d"] = (f"return_amount_{w}d", "sum")
    g = frame.groupby("user_id", sort=True).agg(**named)

    out = pd.DataFrame(index=g.index)
    out["n_events"] = g["n_events"].astype("int32")
    out["recency_days"] = (T - g["t_max"]) / DAY
    out["tenure_days"] = (T - g["t_min"]) / DAY
    out["active_days"] = g["active_days"].astype("int32")
    out["mean_gap_days"] = np.where(
        g["n_events"] > 1,
        (g["t_max"] - g["t_min"]) / DAY / (g["n_events"] - 1),
        (T - g["t_min"]) / DAY,
    )
    out["n_categories"] = g["n_categories"].astype("int32")
    out["n_items"] = g["n_items"].astype("int32")
    for b in spec.behaviors:
        out[f"{b}_count"] = g[f"{b}_count"].astype("int64")
        for w in spec.windows_days:
            out[f"{b}_count_{w}d"] = g[f"{b}_count_{w}d"].astype("int64")
        # Never seen: as old as the user's whole history.
        out[f"{b}_recency_days"] = ((T - g[f"{b}_t_max"]) / DAY).fillna(out["tenure_days"])
    out["monetary_sum"] = g["monetary_sum"]
    out["monetary_mean"] = g["monetary_mean"].fillna(0.0)
    out["monetary_max"] = g["monetary_max"].fillna(0.0)
    for w in spec.windows_days:
        out[f"monetary_sum_{w}d"] = g[f"monetary_sum_{w}d"]
    if spec.returns:
        out["return_amount_sum"] = g["return_amount_sum"]
        for w in spec.windows_days:
            out[f"return_amount_sum_{w}d"] = g[f"return_amount_sum_{w}d"]
    out["purchase_days"] = g["purchase_days"].astype("int32")
    out["btyd_frequency"] = (g["purchase_days"] - 1).clip(lower=0).astype("int32")
    out["btyd_recency_days"] = ((g["buy_t_max"] - g["buy_t_min"]) / DAY).fillna(0.0)
    out["btyd_age_days"] = ((T - g["buy_t_min"]) / DAY).fillna(0.0)
    return out


def _sequences(history: pd.DataFrame, T: float, spec: FeatureSpec) -> pd.DataFrame:
    """One row per user: the last `sequence_length` events as lists, oldest first."""
    ordered = history.sort_values(["user_id", *SEQUENCE_ORDER], na_position="last", kind="stable")
    # The gap is to the previous event in the whole history, so it is taken before truncating.
    gap = ordered.groupby("user_id", sort=False)["t"].diff().fillna(0.0)
    behavior_id = {b: i for i, b in enumerate(spec.behaviors, start=1)}
    steps = pd.DataFrame(
        {
            "user_id": ordered["user_id"],
            "seq_behavior": ordered["behavior"].map(behavior_id).fillna(0).astype("uint8"),
            "seq_log_age_days": np.log(1 + (T - ordered["t"]) / DAY).astype("float32"),
            "seq_log_gap_days": np.log(1 + gap / DAY).astype("float32"),
            "seq_log_amount": np.log(1 + ordered["amount"]).astype("float32"),
        }
    )
    last = steps.groupby("user_id", sort=False).tail(spec.sequence_length)
    return last.groupby("user_id", sort=True)[list(REFERENCE_SEQUENCE_COLUMNS)].agg(list)


def _labels(events: pd.DataFrame, T: float, E: float, users: pd.Index) -> pd.DataFrame:
    """Purchases in [T, E) of the users in the population (0 for users who bought nothing); value is
    net spend: purchases minus returns in [T, E), floored at 0."""
    in_horizon = (events["t"] >= T) & (events["t"] < E)
    window = events[(events["behavior"] == PURCHASE) & in_horizon]
    g = window.groupby("user_id")["amount"].agg(value="sum", n_purchases="size")
    g = g.reindex(users, fill_value=0)
    returned = events[(events["behavior"] == RETURN) & in_horizon].groupby("user_id")["amount"].sum()
    returned = returned.reindex(users, fill_value=0.0)
    out = pd.DataFrame(index=users)
    out["value"] = (g["value"].astype("float64") - returned.astype("float64")).clip(lower=0.0)
    out["n_purchases"] = g["n_purchases"].astype("int32")
    out["bought"] = out["n_purchases"] > 0
    assert list(out.columns) == list(LABEL_COLUMNS)
    return out


def build_features_pandas(
    events: pd.DataFrame,
    cutoff: dt.datetime,
    spec: FeatureSpec | None = None,
    label_end: dt.datetime | None = None,
) -> pd.DataFrame:
    """Feature rows at `cutoff` computed with pandas, sorted by user_id.

    The independent reference for `uservalue.features.sql.feature_sql`: tests cross-check the DuckDB
    definition against it and the featurize benchmark uses it as the baseline. Not used by the
    pipeline. `events` is a canonical events frame (`uservalue.schema`); columns are the same as
    `build_features` returns, less `seq_category` and `seq_item` (see the module docstring).
    """
    spec = spec or FeatureSpec()
    T = _epoch(cutoff)
    columns = ["user_id", "ts", "behavior", "item_id", "category_id", "amount"]
    events = events[columns].assign(t=lambda e: _epoch_seconds(e["ts"])).drop(columns="ts")
    history = events[events["t"] < T]

    features = _aggregates(history, T, spec).join(_sequences(history, T, spec))
    if label_end is not None:
        features = features.join(_labels(events, T, _epoch(label_end), features.index))
    features.insert(0, "cutoff", pd.Timestamp(cutoff).tz_convert("UTC"))
    return features.rename_axis("user_id").reset_index()

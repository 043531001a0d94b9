"""Per-user text features (issue 23): for each behaviour b of `embed_items.feature_behaviors`, the mean of the
vectors (data/item_vectors.parquet, PCA-ordered) of the user's last L items of behaviour b before the cutoff,
keeping the leading `feature_dim` components: columns `text_<b>_<k>`, 0 where the user has no such item
with a text. `add_text_features` is the one function that joins them onto a feature table, for training
and for scoring alike (same events, same vectors, same cutoff -> same columns)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from uservalue.duck import connect, sql_string
from uservalue.text.embed import read_item_vectors

PREFIX = "text_"


def text_feature_columns(behaviors: Sequence[str], dim: int) -> list[str]:
    return [f"{PREFIX}{b}_{k}" for b in behaviors for k in range(dim)]


def user_text_features(events: str | Path, item_vectors: str | Path, cutoffs: Sequence[dt.datetime],
                       behaviors: Sequence[str], last: int, dim: int) -> pd.DataFrame:
    """[cutoff, user_id, text_<b>_<k>...]: one row per (cutoff, user) with at least one such item."""
    items, vectors = read_item_vectors(item_vectors)
    dim = min(dim, vectors.shape[1]) if vectors.size else dim
    columns = text_feature_columns(behaviors, dim)
    if not items or not cutoffs:
        return pd.DataFrame(columns=["cutoff", "user_id", *columns])
    con = connect()
    try:
        con.register("item_index", pd.DataFrame({"item_id": items, "vec_row": np.arange(len(items))}))
        cutoff_frame = pd.DataFrame({"cutoff": pd.to_datetime(list(cutoffs), utc=True)})
        con.register("cutoffs", cutoff_frame)
        wanted = ", ".join(sql_string(b) for b in behaviors)
        recent = con.sql(f"""
            SELECT c.cutoff, e.user_id, e.behavior, i.vec_row
            FROM read_parquet({sql_string(str(events))}) e
            JOIN cutoffs c ON e.ts < c.cutoff
            JOIN item_index i ON e.item_id = i.item_id
            WHERE e.behavior IN ({wanted})
            QUALIFY row_number() OVER (PARTITION BY c.cutoff, e.user_id, e.behavior
                                       ORDER BY e.ts DESC, e.item_id) <= {int(last)}
        """).df()
    finally:
        con.close()
    if recent.empty:
        return pd.DataFrame(columns=["cutoff", "user_id", *columns])
    keys = recent[["cutoff", "user_id"]].drop_duplicates().reset_index(drop=True)
    key_index = pd.MultiIndex.from_frame(keys)
    row = key_index.get_indexer(pd.MultiIndex.from_frame(recent[["cutoff", "user_id"]]))
    out = np.zeros((len(keys), len(behaviors) * dim), np.float64)
    for position, behavior in enumerate(behaviors):
        mask = (recent["behavior"] == behavior).to_numpy()
        if not mask.any():
            continue
        sums = np.zeros((len(keys), dim))
        counts = np.zeros(len(keys))
        np.add.at(sums, row[mask], vectors[recent["vec_row"].to_numpy()[mask], :dim])
        np.add.at(counts, row[mask], 1)
        out[:, position * dim:(position + 1) * dim] = sums / np.maximum(counts, 1)[:, None]
    return pd.concat([keys, pd.DataFrame(out, columns=columns)], axis=1)


def add_text_features(features: pd.DataFrame, events: str | Path, item_vectors: str | Path,
                      behaviors: Sequence[str], last: int, dim: int) -> pd.DataFrame:
    """`features` (rows of user_id at a cutoff) with the text columns joined (0 where a user has none)."""
    cutoffs = sorted(pd.to_datetime(features["cutoff"], utc=True).unique())
    text = user_text_features(events, item_vectors, [pd.Timestamp(c).to_pydatetime() for c in cutoffs],
                              behaviors, last, dim)
    columns = [c for c in text.columns if c.startswith(PREFIX)]
    left = features.drop(columns=[c for c in features.columns if c.startswith(PREFIX)])
    key = pd.to_datetime(left["cutoff"], utc=True)
    joined = left.assign(_cutoff=key).merge(text.rename(columns={"cutoff": "_cutoff"}), how="left",
                                            on=["_cutoff", "user_id"]).drop(columns="_cutoff")
    joined[columns] = joined[columns].fillna(0.0).astype("float64")
    return joined


__all__ = ["PREFIX", "add_text_features", "text_feature_columns", "user_text_features"]

"""Per-user text features (issue 23): for each behaviour b of `embed_items.feature_behaviors`, the mean of the
vectors (data/item_vectors.parquet, PCA-ordered) of the user's last L items of behaviour b before the cutoff,
keeping the leading `feature_dim` components: columns `text_<b>_<k>`, 0 where the user has no such item
with a text. `add_text_features` is the one function that joins them onto a feature table, for training
and for scoring alike (same events, same vectors, same cutoff -> same columns)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.duck import connect, sql_string
from uservalue.errors import InputError
from uservalue.io import atomic_dir, file_sha256
from uservalue.text.embed import read_item_vectors, read_text_spec

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


def _cutoff_micros(values: pd.Series | pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        values = values.to_pandas()
    return pd.to_datetime(values, utc=True).to_numpy(dtype="datetime64[us]").astype(np.int64)


def join_text_feature_sets(features_dir: str | Path, events: str | Path, item_vectors: str | Path,
                           log: Callable[[str], None] = lambda _: None) -> dict[str, int] | None:
    """The featurize stage's text join: append the pooled text columns (the vectors file's TextFeatureSpec)
    to every feature set of `features_dir` and name them in meta.json's spec (`text_columns`), so training,
    evaluation and serving read them as aggregates. Rows and every other column stay as they were; the
    folder is swapped in at once (uservalue.io.atomic_dir). Without vectors (a log without item text: CDNOW,
    Taobao, the default synthetic) nothing is touched and None is returned."""
    import shutil

    from uservalue.features.store import META_FILE, SPLITS, read_meta, write_meta

    features_dir, item_vectors = Path(features_dir), Path(item_vectors)
    if not item_vectors.is_file():
        raise InputError(item_vectors, "file does not exist", expected="the embed_items stage's output")
    if pq.read_metadata(item_vectors).num_rows == 0:
        log(f"text features: none ({item_vectors} has no vectors: the log has no item text)")
        return None
    spec = read_text_spec(item_vectors)
    if spec is None:
        raise InputError(item_vectors, "no text_features metadata", expected="the embed_items stage's output "
                                                                             "(re-run `dvc repro embed_items`)")
    meta = read_meta(features_dir)
    columns: list[str] = []
    rows: dict[str, int] = {}
    with atomic_dir(features_dir) as tmp:
        for name in SPLITS:
            source = features_dir / f"{name}.parquet"
            if not source.is_file():
                continue
            keys = pq.read_table(source, columns=["cutoff", "user_id"]).to_pandas()
            cutoffs = sorted(pd.to_datetime(keys["cutoff"], utc=True).unique())
            text = user_text_features(events, item_vectors, [pd.Timestamp(c).to_pydatetime() for c in cutoffs],
                                      spec.behaviors, spec.last, spec.dim)
            columns = [c for c in text.columns if c.startswith(PREFIX)]
            index = pd.MultiIndex.from_arrays([_cutoff_micros(text["cutoff"]), text["user_id"].astype(str)])
            matrix = np.vstack([text[columns].to_numpy(np.float64), np.zeros((1, len(columns)))])  # last: none
            file = pq.ParquetFile(source)
            schema = file.schema_arrow
            for column in columns:
                schema = schema.append(pa.field(column, pa.float64()))
            with pq.ParquetWriter(tmp / source.name, schema, compression="zstd") as writer:
                for batch in file.iter_batches(batch_size=65_536):
                    found = index.get_indexer(pd.MultiIndex.from_arrays(
                        [_cutoff_micros(batch.column("cutoff")), batch.column("user_id").to_pandas().astype(str)]))
                    values = matrix[np.where(found < 0, len(matrix) - 1, found)]
                    arrays = [*batch.columns, *(pa.array(values[:, j]) for j in range(len(columns)))]
                    writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            rows[name] = file.metadata.num_rows
        for other in features_dir.iterdir():  # anything else beside the sets (kept as it is)
            if other.name not in {f"{n}.parquet" for n in rows} | {META_FILE} and other.is_file():
                shutil.copy2(other, tmp / other.name)
        text_spec = dataclasses.replace(meta.spec, text_columns=tuple(columns), text_vectors=file_sha256(item_vectors))
        write_meta(tmp, meta.model_copy(update={"spec": text_spec, "aggregate_columns": text_spec.aggregate_columns()}))
    log(f"text features: {len(columns)} columns ({', '.join(spec.behaviors)}; last {spec.last}, {spec.dim} "
        f"components) joined onto " + ", ".join(f"{k}={v:,} rows" for k, v in rows.items()))
    return rows


__all__ = ["PREFIX", "add_text_features", "join_text_feature_sets", "text_feature_columns", "user_text_features"]

"""Feature sets on disk: `{train,eval}.parquet` and the typed `meta.json` beside them (one writer,
one reader, so every later stage sees the same split and spec)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from uservalue.config import FeaturizeParams, SplitParams
from uservalue.duck import sql_string
from uservalue.errors import InputError
from uservalue.features.sql import (
    LABEL_COLUMNS,
    SECONDS_PER_DAY,
    SEQUENCE_COLUMNS,
    FeatureSpec,
    connect,
    feature_sql,
    register_events,
)
from uservalue.io import atomic_dir, write_text

META_FILE = "meta.json"
SPLITS = ("train", "eval")


class Window(BaseModel):
    model_config = ConfigDict(frozen=True)

    cutoff: dt.datetime
    label_end: dt.datetime


class FeatureMeta(BaseModel):
    """What the featurize stage wrote: the feature definition, the label windows and row counts."""

    model_config = ConfigDict(frozen=True)

    spec: FeatureSpec
    aggregate_columns: list[str]
    sequence_columns: list[str]
    label_columns: list[str]
    behavior_ids: dict[str, int]
    horizon_days: int
    splits: dict[str, list[Window]]
    rows: dict[str, int]

    @property
    def eval_cutoff(self) -> dt.datetime:
        return self.splits["eval"][0].cutoff

    @property
    def train_cutoffs(self) -> list[dt.datetime]:
        return [w.cutoff for w in self.splits.get("train", [])]


def label_windows(split: SplitParams) -> dict[str, list[tuple[dt.datetime, dt.datetime]]]:
    """(cutoff, label end) per split. Training labels are clipped at the evaluation cutoff so no
    training label ever overlaps the holdout; the clipped length is recorded as `label_days`."""
    horizon = dt.timedelta(days=split.horizon_days)
    eval_cutoff = split.eval_cutoff_utc
    return {
        "train": [(c, min(c + horizon, eval_cutoff)) for c in split.train_cutoffs_utc],
        "eval": [(eval_cutoff, eval_cutoff + horizon)],
    }


def feature_meta(spec: FeatureSpec, horizon_days: int, windows: dict[str, list[tuple[dt.datetime, dt.datetime]]],
                 rows: dict[str, int]) -> FeatureMeta:
    """meta.json of feature sets written for `windows` (split name -> (cutoff, label end)), by any engine."""
    return FeatureMeta(
        spec=spec,
        aggregate_columns=spec.aggregate_columns(),
        sequence_columns=list(SEQUENCE_COLUMNS),
        label_columns=[*LABEL_COLUMNS, "label_days"],
        behavior_ids={b: i for i, b in enumerate(spec.behaviors, start=1)},
        horizon_days=horizon_days,
        splits={name: [Window(cutoff=c, label_end=e) for c, e in cutoffs] for name, cutoffs in windows.items()},
        rows=rows,
    )


def write_feature_sets(
    events: str | Path,
    split: SplitParams,
    params: FeaturizeParams,
    behaviors: tuple[str, ...],
    out_dir: str | Path,
) -> dict[str, int]:
    """The featurize stage: `<out_dir>/{train,eval}.parquet` and `meta.json`, swapped in atomically."""
    spec = FeatureSpec.from_params(params, behaviors)
    windows = label_windows(split)
    rows: dict[str, int] = {}
    con = connect(params)
    try:
        source = register_events(con, events)
        with atomic_dir(out_dir) as tmp:
            for name, cutoffs in windows.items():
                if not cutoffs:
                    continue
                parts = [
                    f"SELECT *, {(end - cutoff).total_seconds() / SECONDS_PER_DAY}::DOUBLE AS label_days "
                    f"FROM ({feature_sql(source, cutoff, spec, end)})"
                    for cutoff, end in cutoffs
                ]
                target = tmp / f"{name}.parquet"
                con.execute(
                    f"COPY ({' UNION ALL '.join(parts)} ORDER BY cutoff, user_id) "
                    f"TO {sql_string(str(target))} (FORMAT PARQUET, COMPRESSION ZSTD)"
                )
                rows[name] = con.execute(f"SELECT count(*) FROM read_parquet({sql_string(str(target))})").fetchone()[0]
            write_meta(tmp, feature_meta(spec, split.horizon_days, windows, rows))
    finally:
        con.close()
    return rows


def write_meta(features_dir: Path, meta: FeatureMeta) -> None:
    write_text(features_dir / META_FILE, meta.model_dump_json(indent=2) + "\n")


def read_meta(features_dir: str | Path) -> FeatureMeta:
    path = Path(features_dir) / META_FILE
    if not path.is_file():
        raise InputError(path, "feature metadata is missing", expected="the featurize stage's meta.json")
    try:
        return FeatureMeta.model_validate_json(path.read_text())
    except ValidationError as error:
        first = error.errors()[0]
        raise InputError(path, first["msg"], column=".".join(map(str, first["loc"])),
                         expected="meta.json as written by the featurize stage (re-run `dvc repro featurize`)") from None


def _features_path(features_dir: str | Path, split: str) -> Path:
    path = Path(features_dir) / f"{split}.parquet"
    if not path.is_file():
        raise InputError(path, f"{split} features are missing", expected="the featurize stage's output")
    return path


def read_features(features_dir: str | Path, split: str, *, users: Sequence[str] | None = None) -> pd.DataFrame:
    """A feature set; with `users`, only their rows (in file order), filtered while reading, so a sample
    never costs the memory of the whole set."""
    path = _features_path(features_dir, split)
    if users is None:
        return pd.read_parquet(path)
    return pd.read_parquet(path, filters=[("user_id", "in", list(users))])


def feature_user_ids(features_dir: str | Path, split: str) -> np.ndarray:
    """The user of every row of a feature set (one column read, not the set)."""
    return pq.read_table(_features_path(features_dir, split), columns=["user_id"]).column("user_id").to_numpy()

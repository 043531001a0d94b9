"""Feature sets the model tests train on: CDNOW (real) and small synthetic logs with planted truth.

Built once per session by the real featurize code (DuckDB), never by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from uservalue.config import FeaturizeParams, SplitParams
from uservalue.features.sql import FeatureSpec
from uservalue.features.store import write_feature_sets

CDNOW_SPLIT = SplitParams(eval_cutoff="1997-10-01", horizon_days=273, train_cutoffs=["1997-07-01", "1997-04-01"])
# The synthetic default calendar runs 1997-01-01 .. 1998-07-01, like CDNOW.
SYNTHETIC_SPLIT = SplitParams(eval_cutoff="1998-01-01", horizon_days=120, train_cutoffs=["1997-09-03", "1997-11-02"])


@dataclass(frozen=True)
class FeatureSets:
    directory: Path
    train: pd.DataFrame
    eval: pd.DataFrame
    meta: dict[str, Any]

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.from_dict(self.meta["spec"])

    @property
    def horizon_days(self) -> int:
        return int(self.meta["horizon_days"])


def build_feature_sets(events: Path, split: SplitParams, out_dir: Path, behaviors: tuple[str, ...],
                       sequence_length: int = 20) -> FeatureSets:
    params = FeaturizeParams(sequence_length=sequence_length, threads=2, memory_limit="2GB")
    write_feature_sets(events, split, params, behaviors, out_dir)
    return FeatureSets(
        directory=out_dir,
        train=pd.read_parquet(out_dir / "train.parquet"),
        eval=pd.read_parquet(out_dir / "eval.parquet"),
        meta=json.loads((out_dir / "meta.json").read_text()),
    )


@pytest.fixture(scope="session")
def cdnow_features(cdnow_events: Path, tmp_path_factory: pytest.TempPathFactory) -> FeatureSets:
    return build_feature_sets(cdnow_events, CDNOW_SPLIT, tmp_path_factory.mktemp("cdnow_features"),
                              ("view", "fav", "cart", "buy"))


@pytest.fixture(scope="session")
def synthetic_features(small_synthetic: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> FeatureSets:
    events, _truth = small_synthetic
    return build_feature_sets(events, SYNTHETIC_SPLIT, tmp_path_factory.mktemp("synthetic_features"),
                              ("view", "fav", "cart", "buy"))

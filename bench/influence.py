"""Behaviour-influence cost (issue 21): per-request latency of ValueModel.predict_arrays (the
prediction plus the per-user Shapley shares) and of the per-event effects ("explain": "effect") for
one user, and the train stage's tables on N users, for linear, gbdt and mlp on a small synthetic log.

    python bench/influence.py [--users 3000] [--repeat 300]

Printed and written to bench/out/influence.json, never asserted. The same script runs on an older
checkout (PYTHONPATH=<its src>) for the per-request figure alone, to compare with the shares that
preceded the one definition."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"linear": {}, "gbdt": {"max_rounds": 200, "learning_rate": 0.1, "early_stopping_rounds": 20},
          "mlp": {"max_epochs": 3, "user_buckets": 1024}}


def _timed(fn, repeat: int) -> float:
    """Median milliseconds of fn() over `repeat` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()

    import torch

    from uservalue.config import FeaturizeParams, SplitParams, SyntheticSource
    from uservalue.data.sources.synthetic import generate
    from uservalue.features.sql import FeatureSpec
    from uservalue.features.store import write_feature_sets
    from uservalue.models.base import FitContext
    from uservalue.models.catalog import create_model

    torch.set_num_threads(1)  # as the service (serving.scorer)
    try:
        from uservalue.models import influence
    except ImportError:  # an older checkout: per-request figures only
        influence = None
    split = SplitParams(eval_cutoff="1998-01-01", horizon_days=120, train_cutoffs=["1997-11-02"])
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(SyntheticSource(users=args.users, events_per_user=60, seed=7), root / "events.parquet", root / "truth")
        write_feature_sets(root / "events.parquet", split, FeaturizeParams(sequence_length=50, threads=2),
                           ("view", "fav", "cart", "buy"), root / "features")
        train = pd.read_parquet(root / "features" / "train.parquet")
        evaluation = pd.read_parquet(root / "features" / "eval.parquet")
        spec = FeatureSpec.from_dict(json.loads((root / "features" / "meta.json").read_text())["spec"])
        from uservalue.features.online import FeatureArrays  # noqa: F401 (both checkouts have it)

        for name, params in MODELS.items():
            model = create_model(name, params, spec, 120)
            model.fit(train, FitContext(seed=0, device="cpu"))
            rows = _rows(evaluation.head(200), spec, influence)
            one = rows.take(np.array([7]))
            figures = {"predict_arrays_1_user_ms": _timed(lambda m=model, o=one: m.predict_arrays(o), args.repeat)}
            if influence is not None:
                figures["effects_1_user_ms"] = _timed(lambda m=model, o=one: influence.per_user_effects(m, o),
                                                      args.repeat)
                start = time.perf_counter()
                sample = influence.arrays_from_frame(train.head(2000), spec)
                influence.influence_tables(model, sample, influence.seen_behaviors(train, spec.behaviors))
                figures["tables_2000_users_s"] = time.perf_counter() - start
            results[name] = figures
            print(name, {k: round(v, 3) for k, v in figures.items()}, flush=True)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "influence.json").write_text(json.dumps(results, indent=2))


def _rows(frame: pd.DataFrame, spec, influence):
    if influence is not None:
        return influence.arrays_from_frame(frame, spec)
    # an older checkout: the online engine's arrays from the frame's Arrow table
    import pyarrow as pa

    from uservalue.features.online import FeatureArrays, output_schema
    from uservalue.features.sql import SEQUENCE_COLUMNS

    table = pa.Table.from_pandas(frame[output_schema(spec).names], schema=output_schema(spec), preserve_index=False)
    first = table.column(SEQUENCE_COLUMNS[0]).combine_chunks()
    return FeatureArrays(spec, np.asarray(frame["user_id"].astype(str), dtype=object),
                         np.zeros(len(frame), dtype=np.int64),
                         {c: table.column(c).to_numpy() for c in spec.aggregate_columns()},
                         first.offsets.to_numpy().astype(np.int64),
                         {c: table.column(c).combine_chunks().values.to_numpy() for c in SEQUENCE_COLUMNS})


if __name__ == "__main__":
    main()

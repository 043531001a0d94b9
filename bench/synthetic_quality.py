"""Each model's distance to the best possible on planted data (issue 16 §3).

On a synthetic log the true expected value of every user is known (`expected_value(truth_dir, cutoff,
horizon)`): ranking users by it is the best any model can do on that sample. For each seed and drift
level this trains every model on the training cutoffs, scores the evaluation cutoff, and prints each
model's Gini, decile MAPE and total error next to the truth's own, with the ratios the issue targets
(champion Gini >= 0.95 x the truth's; decile MAPE within 0.05 of the truth's). Figures go to
bench/out/synthetic_quality.json. Nothing is asserted.

    .venv/bin/python bench/synthetic_quality.py [--users 5000] [--seeds 0 1] [--drifts 0.0 1.0]
                                                [--models historical btyd gbdt linear mlp sequence]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
SPLIT = {"eval_cutoff": "1998-01-01", "horizon_days": 120, "train_cutoffs": ["1997-09-03", "1997-11-02"]}
BEHAVIORS = ("view", "fav", "cart", "buy")
# Small deep models: the figure is the distance to the truth, not the best training budget.
MODEL_PARAMS = {"mlp": {"max_epochs": 8}, "sequence": {"max_epochs": 4}, "gbdt": {"num_threads": 2}}


def one_log(workdir: Path, users: int, seed: int, drift: float, models: list[str]) -> dict:
    import numpy as np

    from uservalue.config import FeaturizeParams, SplitParams, SyntheticSource
    from uservalue.data.sources.synthetic import expected_value, generate
    from uservalue.features.store import read_features, read_meta, write_feature_sets
    from uservalue.lifecycle import metrics
    from uservalue.models.base import FitContext
    from uservalue.models.catalog import create_model

    tag = f"u{users}_s{seed}_d{drift:g}"
    events, truth, features = workdir / f"events_{tag}.parquet", workdir / f"truth_{tag}", workdir / f"features_{tag}"
    if not events.exists():
        generate(SyntheticSource(users=users, seed=seed, drift=drift), events, truth)
    if not (features / "meta.json").exists():
        write_feature_sets(events, SplitParams(**SPLIT), FeaturizeParams(sequence_length=50), BEHAVIORS, features)
    meta = read_meta(features)
    train, holdout = read_features(features, "train"), read_features(features, "eval")
    actual = holdout["value"].to_numpy(dtype=np.float64)
    bought = holdout["bought"].to_numpy(dtype=bool)

    oracle = expected_value(truth, meta.eval_cutoff, meta.horizon_days).set_index("user_id")
    oracle = oracle.reindex(holdout["user_id"].astype(str)).fillna(0)
    # Purchases are Poisson given the latent state: P(at least one) = 1 - exp(-expected purchases).
    rows = {"truth": metrics.value_metrics(actual, oracle["expected_value"].to_numpy(), bought,
                                           1 - np.exp(-oracle["expected_buys"].to_numpy()))}
    seconds = {}
    for name in models:
        started = time.perf_counter()
        model = create_model(name, MODEL_PARAMS.get(name, {}), meta.spec, meta.horizon_days)
        model.fit(train, FitContext(seed=seed, device="auto"))
        predicted = model.predict(holdout)
        rows[name] = metrics.value_metrics(actual, predicted["expected_value"].to_numpy(), bought,
                                           predicted["p_buy"].to_numpy())
        seconds[name] = round(time.perf_counter() - started, 1)
    return {"users": len(holdout), "metrics": rows, "fit_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--drifts", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--models", nargs="+", default=["historical", "btyd", "gbdt", "linear", "mlp", "sequence"])
    args = parser.parse_args()
    workdir = OUT / "synthetic_quality"
    workdir.mkdir(parents=True, exist_ok=True)

    results = []
    for seed in args.seeds:
        for drift in args.drifts:
            run = one_log(workdir, args.users, seed, drift, args.models)
            truth = run["metrics"]["truth"]
            print(f"\nseed {seed}, drift {drift:g}: {run['users']} users at the evaluation cutoff "
                  f"(truth: Gini {truth['gini']:.3f}, decile MAPE {truth['decile_mape']:.3f}, "
                  f"total error {truth['total_error']:+.1%})")
            print(f"| {'model':<10} | gini  | gini/truth | decile_mape | mape-truth | total_error | fit s |")
            print(f"|{'-' * 12}|-------|------------|-------------|------------|-------------|-------|")
            for name, row in run["metrics"].items():
                ratio = row["gini"] / truth["gini"] if truth["gini"] else float("nan")
                print(f"| {name:<10} | {row['gini']:.3f} | {ratio:10.3f} | {row['decile_mape']:11.3f} | "
                      f"{row['decile_mape'] - truth['decile_mape']:+10.3f} | {row['total_error']:+11.1%} | "
                      f"{run['fit_seconds'].get(name, 0):5.1f} |")
            results.append({"seed": seed, "drift": drift, **run})
    (OUT / "synthetic_quality.json").write_text(json.dumps({"users": args.users, "split": SPLIT, "runs": results},
                                                           indent=2))
    print(f"\nwritten: {OUT / 'synthetic_quality.json'}")


if __name__ == "__main__":
    main()

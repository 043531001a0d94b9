"""Recommendation quality on a synthetic world with planted user-item affinities (issue 18 targets): every
recommender of params `recs.models` fitted on the events before the cutoff and scored on the items of each
user's events in the horizon after it, beside the planted truth's own ranking (its P(item | user)).

    python bench/recs_quality.py [--users 20000] [--events-per-user 100] [--affinity 0.5] [--max-eval-users 5000]

Targets: the best model's Recall@20 >= 2x popularity's and >= 0.8x the planted truth's. Printed and written
to bench/out/recs_quality.json, never asserted. Generating and fitting take minutes at the default size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from uservalue.config import SyntheticSource, load_params
from uservalue.data.sources.synthetic import generate
from uservalue.io import write_json
from uservalue.recs.base import FitOptions
from uservalue.recs.catalog import create_recommender
from uservalue.recs.evaluate import METRIC_KEYS, evaluate_recommender, evaluate_truth, time_split

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--events-per-user", type=float, default=100.0)
    parser.add_argument("--affinity", type=float, default=0.5)
    parser.add_argument("--categories", type=int, default=None, help="default: params data.synthetic.categories")
    parser.add_argument("--tastes", type=int, default=None, help="default: params data.synthetic.tastes")
    parser.add_argument("--max-eval-users", type=int, default=5000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; 1 is often faster on busy shared cores)")
    parser.add_argument("--models", default=None, help="comma-separated kinds of params recs.models (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KIND.PARAM=JSON",
                        help="override one recommender param, e.g. --set taste.gamma=50 (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "recs_quality.json")
    args = parser.parse_args()
    params = load_params(args.params)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    world = {"users": args.users, "events_per_user": args.events_per_user, "affinity": args.affinity,
             **({"categories": args.categories} if args.categories else {}), **({"tastes": args.tastes} if args.tastes else {})}
    source = params.data.synthetic.model_copy(update=world)
    source = SyntheticSource.model_validate(source.model_dump())
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        generate(source, Path(tmp) / "events.parquet", Path(tmp) / "truth")
        events = pd.read_parquet(Path(tmp) / "events.parquet",
                                 columns=["user_id", "ts", "behavior", "item_id", "category_id"])
        # The split the pipeline would use on this log (params `split`, `auto` resolved as featurize does).
        from uservalue.data.window import resolve_split_for

        split_params, _ = resolve_split_for(params.split, params.data.model_copy(update={"source": "synthetic"}),
                                            params.validate_, Path(tmp) / "events.parquet")
        cutoff, horizon = split_params.eval_cutoff_utc, int(split_params.horizon_days)
        print(f"generated {len(events):,} events of {args.users:,} users in {time.perf_counter() - started:.1f} s "
              f"(affinity {source.affinity}, {source.categories} categories, {source.tastes} tastes)")
        split = time_split(events, cutoff, horizon, exclude_bought=params.recs.exclude_bought,
                           max_users=args.max_eval_users, seed=params.train.seed)
        print(f"time split at {cutoff.date()}: {len(split.truth):,} users evaluated, "
              f"{split.catalog_items:,} items before the cutoff")
        results: dict[str, dict[str, float]] = {}
        chosen = args.models.split(",") if args.models else list(params.recs.models)
        for kind in chosen:
            model_params = dict(params.recs.models.get(kind, {}))
            for override in args.set:
                name, _, value = override.partition("=")
                if name.split(".", 1)[0] == kind:
                    model_params[name.split(".", 1)[1]] = json.loads(value)
            model = create_recommender(kind, model_params)
            started = time.perf_counter()
            summary = model.fit(events, cutoff, FitOptions(params.train.seed, args.device))
            fit_seconds = time.perf_counter() - started
            started = time.perf_counter()
            metrics = evaluate_recommender(model, split)
            results[kind] = {**metrics, "fit_seconds": fit_seconds, "score_seconds": time.perf_counter() - started,
                             **{f"fit_{k}": v for k, v in summary.items()}}
            print(f"{kind:>13}: " + ", ".join(f"{k}={metrics[k]:.4f}" for k in METRIC_KEYS)
                  + f"  (fit {fit_seconds:.1f} s)", flush=True)
        truth = evaluate_truth(str(Path(tmp) / "truth"), split)
        print(f"{'planted truth':>13}: " + ", ".join(f"{k}={truth[k]:.4f}" for k in METRIC_KEYS))
    best = max(results, key=lambda k: results[k]["recall_at_20"])
    recall = results[best]["recall_at_20"]
    ratios = {"best": best, "best_over_popularity": recall / max(results.get("popularity", {}).get("recall_at_20", 0), 1e-12),
              "best_over_truth": recall / max(truth["recall_at_20"], 1e-12)}
    print(f"best {best}: Recall@20 {recall:.4f} = {ratios['best_over_popularity']:.2f}x popularity (target >= 2), "
          f"{ratios['best_over_truth']:.2f}x the planted truth (target >= 0.8)")
    write_json(args.out, {"measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                          "world": source.model_dump(mode="json"),
                          "eval_users": len(split.truth), "models": results, "planted_truth": truth, **ratios})


if __name__ == "__main__":
    main()

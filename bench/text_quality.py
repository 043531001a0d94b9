"""Item text in the value models (issue 23): each model's Gini with and without the users' pooled text vectors.

On a synthetic log with titles (data.synthetic.titles: value words raise price and purchase propensity, users
lean persistently towards such items, most items are rare) this embeds every distinct title with the shipped
all-MiniLM-L6-v2 (uservalue.text.embed: offline, cached by text hash under bench/out/text_quality/cache),
builds the features at the training and evaluation cutoffs, joins the per-user text features with
`uservalue.text.features.add_text_features` (the same function for training rows and scored rows), and trains
each model twice: on the aggregates alone and with the text columns. Figures (Gini, AUC, decile MAPE, fit
seconds, the embedding's texts/s) are printed and written to bench/out/text_quality.json; nothing is asserted.

    .venv/bin/python bench/text_quality.py [--users 3000] [--seed 0] [--models gbdt linear mlp sequence gnn]
        [--value-words 3 --price-effect 1.0 --buy-effect 1.5 --lean 1.0 --consider-days 60]
        [--fit-seeds 0 1 2] [--text-tower 0] [--set mlp.max_epochs=30] [--layout online_retail]  (README "Item text")

--fit-seeds trains each model once per seed on the same log and reports the mean (and the Gini's standard
deviation); --layout online_retail writes the log's purchases as an Online Retail export with a Description
per line and reads it back through `ingest` (data.file.columns.item_text), as a shop's order export would come.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
SPLIT = {"eval_cutoff": "1998-01-01", "horizon_days": 120, "train_cutoffs": ["1997-09-03", "1997-11-02"]}
BEHAVIORS = ("view", "fav", "cart", "buy")
MODEL_PARAMS = {"sequence": {"max_epochs": 4}, "gbdt": {"num_threads": 2}}  # mlp, gnn: their defaults
TITLES = {"words": 60, "words_per_title": 3}  # + value_words, price_effect, buy_effect, lean from the options


def write_online_retail(events: Path, path: Path) -> None:
    """The synthetic log's purchases in the UCI Online Retail layout: one invoice per user and day, the
    item's title as `Description`, the amount as `Price` of one unit."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    buys = pq.read_table(events, columns=["user_id", "ts", "behavior", "item_id", "amount", "item_text"]).to_pandas()
    buys = buys[buys["behavior"] == "buy"]
    day = buys["ts"].dt.strftime("%Y%m%d")
    invoice = (buys["user_id"].astype(str) + day).astype("category").cat.codes.astype(np.int64) + 500_000
    retail = {"Invoice": invoice.astype(str), "StockCode": buys["item_id"], "Description": buys["item_text"],
              "Quantity": 1, "InvoiceDate": buys["ts"].dt.strftime("%d/%m/%Y %H:%M"), "Price": buys["amount"].round(2),
              "Customer ID": buys["user_id"], "Country": "United Kingdom"}
    pd.DataFrame(retail).to_csv(path, index=False)


def ingest_online_retail(path: Path, out: Path, truth: Path) -> None:
    """The export read as a user maps it in params.yaml (data.file, README "Transaction logs"), with
    `columns.item_text: Description`."""
    from uservalue.config import DataParams
    from uservalue.data.sources import ingest

    file = {"columns": {"user_id": "Customer ID", "ts": "InvoiceDate", "behavior": None, "item_id": "StockCode",
                        "category_id": None, "quantity": "Quantity", "amount": None, "unit_price": "Price",
                        "item_text": "Description"},
            "default_behavior": "buy", "missing_user": "drop", "returns": {"column": "Invoice", "prefix": "C"},
            "ts_format": "%d/%m/%Y %H:%M"}
    ingest(DataParams(source="file", path=str(path), behaviors=("buy", "return"), file=file), out, truth,
           out.with_suffix(".rejects.csv"))


def run(workdir: Path, users: int, seed: int, models: list[str], text_cfg: dict, titles: dict,
        fit_seeds: list[int], overrides: dict[str, dict], layout: str = "events") -> dict:
    import numpy as np

    from uservalue.config import EmbedItemsParams, FeaturizeParams, SplitParams, SyntheticSource
    from uservalue.data.sources.synthetic import generate
    from uservalue.features.store import read_features, read_meta, write_feature_sets
    from uservalue.lifecycle import metrics
    from uservalue.models.base import FitContext
    from uservalue.models.catalog import create_model
    from uservalue.text.embed import embed_items
    from uservalue.text.features import add_text_features, text_feature_columns

    tag = (f"u{users}_s{seed}_v{titles['value_words']}_p{titles['price_effect']:g}_b{titles['buy_effect']:g}"
           f"_l{titles['lean']:g}_f{titles['lean_from_spend']:g}_c{titles['consider_days']:g}_o{int(titles['onset'])}")
    events, truth, features = workdir / f"events_{tag}.parquet", workdir / f"truth_{tag}", workdir / f"features_{tag}"
    vectors = workdir / f"item_vectors_{tag}.parquet"
    source = SyntheticSource(users=users, seed=seed, categories=60, items_per_category=100, titles=titles)
    if not events.exists():
        generate(source, events, truth)
    behaviors_of_log = BEHAVIORS
    if layout == "online_retail":  # the same purchases as an order export with a Description per line
        retail = workdir / f"online_retail_{tag}.csv"
        ingested = workdir / f"events_retail_{tag}.parquet"
        if not ingested.exists():
            write_online_retail(events, retail)
            ingest_online_retail(retail, ingested, workdir / f"truth_retail_{tag}")
        events, features = ingested, workdir / f"features_retail_{tag}"
        vectors = workdir / f"item_vectors_retail_{tag}.parquet"
        behaviors_of_log = ("buy",)
        text_cfg = {**text_cfg, "behaviors": ["buy"]}
    embed = embed_items(events, vectors, EmbedItemsParams(cache_dir=str(workdir / "cache"), pca_dim=32,
                                                          seed=seed), log=print)
    if not (features / "meta.json").exists():
        write_feature_sets(events, SplitParams(**SPLIT), FeaturizeParams(sequence_length=50), behaviors_of_log,
                           features)
    meta = read_meta(features)
    train, holdout = read_features(features, "train"), read_features(features, "eval")
    behaviors, last, dim = text_cfg["behaviors"], text_cfg["last"], text_cfg["dim"]
    started = time.perf_counter()
    train_text = add_text_features(train, events, vectors, behaviors, last, dim)
    holdout_text = add_text_features(holdout, events, vectors, behaviors, last, dim)
    join_seconds = round(time.perf_counter() - started, 2)
    text_spec = dataclasses.replace(meta.spec, text_columns=tuple(text_feature_columns(behaviors, dim)))
    actual = holdout["value"].to_numpy(dtype=np.float64)
    bought = holdout["bought"].to_numpy(dtype=bool)
    rows: dict[str, dict] = {}
    for name in models:
        params = {**MODEL_PARAMS.get(name, {}), **(overrides.get(name) or {})}
        for variant, spec, fit_rows, scored in (("plain", meta.spec, train, holdout),
                                                ("text", text_spec, train_text, holdout_text)):
            runs = []
            for fit_seed in fit_seeds:  # the training seed only: the log, its titles and vectors stay
                begun = time.perf_counter()
                model = create_model(name, params, spec, meta.horizon_days)
                model.fit(fit_rows, FitContext(seed=fit_seed, device="auto"))
                predicted = model.predict(scored)
                row = metrics.value_metrics(actual, predicted["expected_value"].to_numpy(), bought,
                                            predicted["p_buy"].to_numpy())
                runs.append({**row, "fit_seed": fit_seed, "fit_seconds": round(time.perf_counter() - begun, 1)})
                print(f"{name} ({variant}, fit seed {fit_seed}): gini {row['gini']:.4f}", flush=True)
            mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]
                    if key != "fit_seed" and isinstance(runs[0][key], (int, float))}
            rows.setdefault(name, {})[variant] = {**mean, "gini_sd": float(np.std([r["gini"] for r in runs])),
                                                  "runs": runs}
    return {"users": len(holdout), "items_with_text": embed.items, "distinct_texts": embed.texts,
            "embed": embed.as_dict(), "join_seconds": join_seconds, "metrics": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0, help="the synthetic log's seed")
    parser.add_argument("--fit-seeds", type=int, nargs="+", default=None,
                        help="training seeds; each model's figures are their mean (default: --seed)")
    parser.add_argument("--set", nargs="*", default=[], metavar="MODEL.KEY=VALUE",
                        help="a model's parameter, e.g. mlp.max_epochs=30 (a YAML value)")
    parser.add_argument("--layout", choices=["events", "online_retail"], default="events",
                        help="online_retail: the purchases written as an Online Retail export with a Description "
                             "per line, read back by ingest (purchase-only: buy features, buy text)")
    parser.add_argument("--text-tower", type=int, default=None,
                        help="train.<deep model>.text_tower (0: the text columns join the aggregate tower)")
    parser.add_argument("--models", nargs="+", default=["gbdt", "linear", "mlp", "sequence"])
    parser.add_argument("--out", default="text_quality.json", help="figures file under bench/out/")
    parser.add_argument("--last", type=int, default=20, help="embed_items.feature_last")
    parser.add_argument("--dim", type=int, default=16, help="embed_items.feature_dim")
    parser.add_argument("--price-effect", type=float, default=0.7, help="data.synthetic.titles.price_effect")
    parser.add_argument("--buy-effect", type=float, default=1.0, help="data.synthetic.titles.buy_effect")
    parser.add_argument("--lean", type=float, default=0.9, help="data.synthetic.titles.lean")
    parser.add_argument("--lean-from-spend", type=float, default=1.0, help="data.synthetic.titles.lean_from_spend")
    parser.add_argument("--consider-days", type=float, default=0.0,
                        help="data.synthetic.titles.consider_days (value items bought later: after the cutoff)")
    parser.add_argument("--onset", action="store_true", help="data.synthetic.titles.onset (the lean starts mid-life)")
    parser.add_argument("--value-words", type=int, default=10,
                        help="data.synthetic.titles.value_words (10: every premium-sounding word of the vocabulary)")
    args = parser.parse_args()
    workdir = OUT / "text_quality"
    workdir.mkdir(parents=True, exist_ok=True)
    text_cfg = {"behaviors": ["view", "cart", "buy"], "last": args.last, "dim": args.dim}
    titles = {**TITLES, "value_words": args.value_words, "price_effect": args.price_effect, "buy_effect": args.buy_effect,
              "lean": args.lean, "lean_from_spend": args.lean_from_spend, "consider_days": args.consider_days, "onset": args.onset}
    deep = {"mlp", "sequence", "gnn"}
    overrides: dict[str, dict] = {name: {"text_tower": args.text_tower} for name in deep} if args.text_tower is not None else {}
    for setting in args.set:
        import yaml

        key, _, value = setting.partition("=")
        model, _, field = key.partition(".")
        overrides.setdefault(model, {})[field] = yaml.safe_load(value)
    result = run(workdir, args.users, args.seed, args.models, text_cfg, titles, args.fit_seeds or [args.seed],
                 overrides, args.layout)
    print(f"\n{result['users']} users at the evaluation cutoff; {result['distinct_texts']} distinct titles embedded "
          f"at {result['embed']['texts_per_s']} texts/s ({result['embed']['device']}); text join "
          f"{result['join_seconds']} s")
    seeds = len(args.fit_seeds or [args.seed])
    print(f"(mean over {seeds} training seed{'s' if seeds > 1 else ''}; ± the standard deviation of the Gini)")
    print("| model | Gini | Gini with text | Δ Gini | AUC | AUC with text | fit s (plain / text) |")
    print("|---|---|---|---|---|---|---|")
    for name, row in result["metrics"].items():
        plain, text = row["plain"], row["text"]
        print(f"| {name} | {plain['gini']:.3f} ± {plain['gini_sd']:.3f} | {text['gini']:.3f} ± {text['gini_sd']:.3f} | "
              f"{text['gini'] - plain['gini']:+.3f} | {plain['auc']:.3f} | {text['auc']:.3f} | "
              f"{plain['fit_seconds']:.1f} / {text['fit_seconds']:.1f} |")
    (OUT / args.out).write_text(json.dumps({"args": vars(args), "titles": titles, "split": SPLIT,
                                                       **result}, indent=2, default=str))
    print(f"\nwritten: {OUT / args.out}")


if __name__ == "__main__":
    main()

"""Training time per epoch of the graph model ("gnn") on a synthetic log of ~10^7 events.

    .venv/bin/python bench/train_gnn.py [--users 100000] [--events-per-user 100] [--epochs 2]
                                        [--device auto|cpu|cuda] [--threads N] [--batch-size N]

Uses the synthetic log and features of bench/train_sequence.py (built once under
bench/out/train_sequence/ and reused; not timed), then times the gnn's graph construction (one
graph per training cutoff) and trains it for --epochs epochs (no early stopping), printing one row
per epoch: device, training rows, epoch seconds (training + validation pass) and training samples
per second; then the scoring speed on the evaluation rows. Figures go to bench/out/train_gnn.json.
Nothing is asserted about time.

--threads sets torch's intra-op threads (default: torch's own). On a machine whose cores are
shared with other busy processes, one thread can be many times faster than two: every parallel
region then waits for a descheduled thread.

Quick CPU check:  .venv/bin/python bench/train_gnn.py --users 2000 --epochs 1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events-per-user", type=float, default=100.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model's default")
    parser.add_argument("--sequence-length", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=OUT / "train_sequence")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    import torch
    from train_sequence import ensure_features  # bench/ is on sys.path when this script runs

    from uservalue.features.sql import FeatureSpec
    from uservalue.models.base import FitContext
    from uservalue.models.deep.gnn import GnnModel
    from uservalue.models.deep.runtime import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    features, info = ensure_features(args.workdir, args.users, args.events_per_user, args.sequence_length)
    meta = json.loads((features / "meta.json").read_text())
    start = time.perf_counter()
    train = pd.read_parquet(features / "train.parquet")
    evaluation = pd.read_parquet(features / "eval.parquet")
    read_seconds = time.perf_counter() - start
    print(f"events: {info['events']:,} ({args.users:,} users); train rows {len(train):,}, eval rows "
          f"{len(evaluation):,}; features at {features} (read in {read_seconds:.1f} s)")
    for step in ("generate", "featurize"):
        if f"{step}_seconds" in info:
            print(f"  {step}: {info[f'{step}_seconds']:.1f} s (not part of the timings below)")

    device = resolve_device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    raw = {"max_epochs": args.epochs, "patience": args.epochs + 1}
    if args.batch_size:
        raw["batch_size"] = args.batch_size
    spec = FeatureSpec.from_dict(meta["spec"])
    model = GnnModel.from_config(raw, spec, meta["horizon_days"])

    # The graph construction alone (fit builds it again, inside "fit total").
    start = time.perf_counter()
    model._graph_of = {c: i for i, c in enumerate(sorted(train["cutoff"].unique(), reverse=True))}
    data = model.tensors(train, labels=True)
    tensors_seconds = time.perf_counter() - start
    start = time.perf_counter()
    graph = model.cutoff_graph(data, np.flatnonzero(data.user_bucket.numpy() == 0), seed=0)
    graph_seconds = time.perf_counter() - start
    model._graph_of = None
    del data
    print(f"tensors {tensors_seconds:.1f} s; one cutoff's graph {graph_seconds:.1f} s "
          f"(at most {model.params.graph_users:,} users; {int((graph.weights > 0).sum()):,} two-hop neighbours kept)")

    epochs: list[dict] = []

    def record(metrics: dict[str, float], step: int) -> None:
        epochs.append({"epoch": step, **metrics})
        print(f"  epoch {step}: {metrics['epoch_seconds']:.1f} s, {metrics['samples_per_second']:,.0f} samples/s, "
              f"train {metrics['train_loss']:.4f} valid {metrics['valid_loss']:.4f}", flush=True)

    print(f"training on {name}, params {model.params.model_dump()}", flush=True)
    fit_start = time.perf_counter()
    summary = model.fit(train, FitContext(seed=0, device=args.device, log_metrics=record))
    fit_seconds = time.perf_counter() - fit_start
    start = time.perf_counter()
    model.predict(evaluation)
    predict_seconds = time.perf_counter() - start

    print(f"\n{'device':<10}{'train rows':>12}{'epoch':>7}{'epoch s':>10}{'samples/s':>12}")
    for e in epochs:
        print(f"{device.type:<10}{summary['train_rows']:>12,}{e['epoch']:>7}{e['epoch_seconds']:>10.1f}"
              f"{e['samples_per_second']:>12,.0f}")
    print(f"\nfit total {fit_seconds:.1f} s (tensors, {summary['graphs']} graphs, training); scoring "
          f"{len(evaluation):,} rows in {predict_seconds:.1f} s ({len(evaluation) / predict_seconds:,.0f} rows/s)")

    result = {
        "users": args.users, "events_per_user": args.events_per_user, **info,
        "device": device.type, "device_name": name, "threads": torch.get_num_threads(),
        "train_rows": summary["train_rows"], "valid_rows": summary["valid_rows"],
        "tensors_seconds": tensors_seconds, "graph_seconds_per_cutoff": graph_seconds,
        "epochs": epochs, "fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
        "predict_rows": len(evaluation), "params": model.params.model_dump(mode="json"),
        "python": platform.python_version(), "torch": torch.__version__, "argv": sys.argv[1:],
    }
    out = OUT / "train_gnn.json"
    partial = out.with_suffix(".json.tmp")
    partial.write_text(json.dumps(result, indent=2, default=str) + "\n")
    partial.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

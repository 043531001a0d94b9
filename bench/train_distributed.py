"""Epoch time of a deep model on 1 process and on N processes (torchrun + DistributedDataParallel).

    .venv/bin/python bench/train_distributed.py [--model sequence|mlp] [--users 5000]
                                                [--events-per-user 30] [--epochs 3] [--processes 2]
                                                [--device cpu|cuda]

Generates a small synthetic log and its features once under bench/out/train_distributed/ (not
timed), then fits the model with the same seed on one process with one thread, on one process with
all the machine's threads, and on --processes processes (`train.<model>.distributed.nproc_per_node`;
on the CPU, cores / N threads each), --epochs epochs each without early stopping, and prints per
run: the epoch seconds (training + validation pass, as rank 0 measures them), samples/s, the fit's
wall time (with torchrun's start-up: the workers import torch and load the prepared tensors) and the
best validation loss. Figures go to bench/out/train_distributed.json. Nothing is asserted about time.

On a 2-core CPU no speed-up is expected from the processes themselves: two processes share the two
cores that one process's two threads would use, and add gradient all-reduces and start-up. On cores
shared with other work, one process's intra-op threads can be much slower than one thread (they
wait on each other), which the one-thread run separates from the effect of the processes.
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
SPLIT = {"eval_cutoff": "1998-01-01", "horizon_days": 120, "train_cutoffs": ["1997-09-03", "1997-11-02"]}
BEHAVIORS = ("view", "fav", "cart", "buy")


def ensure_features(workdir: Path, users: int, events_per_user: float, sequence_length: int) -> Path:
    """Synthetic events -> {train,eval}.parquet, built once per size (not timed)."""
    from uservalue.config import FeaturizeParams, SplitParams, SyntheticSource
    from uservalue.data.sources.synthetic import generate
    from uservalue.features.store import write_feature_sets

    events = workdir / f"events_u{users}_e{events_per_user:g}.parquet"
    features = workdir / f"features_u{users}_e{events_per_user:g}_L{sequence_length}"
    if not events.exists():
        generate(SyntheticSource(users=users, events_per_user=events_per_user), events, workdir / f"truth_u{users}")
    if not (features / "meta.json").exists():
        write_feature_sets(events, SplitParams(**SPLIT), FeaturizeParams(sequence_length=sequence_length),
                           BEHAVIORS, features)
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sequence", "mlp"], default="sequence")
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--events-per-user", type=float, default=30.0)
    parser.add_argument("--sequence-length", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--workdir", type=Path, default=OUT / "train_distributed")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from uservalue.features.sql import FeatureSpec
    from uservalue.models.base import FitContext
    from uservalue.models.catalog import create_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    features = ensure_features(args.workdir, args.users, args.events_per_user, args.sequence_length)
    meta = json.loads((features / "meta.json").read_text())
    train = pd.read_parquet(features / "train.parquet")
    cores = os.cpu_count() or 1
    print(f"{args.model} on {args.device}: {len(train):,} training rows ({args.users:,} users), "
          f"{args.epochs} epochs, {cores} cores", flush=True)

    runs = []
    default_threads = torch.get_num_threads()
    # one process with one thread, one process with all the threads, N processes sharing the cores
    for processes, threads in ((1, 1), (1, default_threads), (args.processes, max(1, cores // args.processes))):
        torch.set_num_threads(threads if processes == 1 else default_threads)
        model = create_model(args.model, {"max_epochs": args.epochs, "patience": args.epochs + 1},
                             FeatureSpec.from_dict(meta["spec"]), meta["horizon_days"])
        epochs: list[dict] = []
        ctx = FitContext(seed=0, device=args.device, log_metrics=lambda m, s, epochs=epochs: epochs.append(m),
                         extra={"nproc_per_node": processes} if processes > 1 else {})
        start = time.perf_counter()
        summary = model.fit(train, ctx)
        wall = time.perf_counter() - start
        epoch_seconds = [e["epoch_seconds"] for e in epochs]
        run = {"processes": processes, "threads_per_process": threads, "epoch_seconds": epoch_seconds,
               "samples_per_second": [e["samples_per_second"] for e in epochs], "fit_wall_seconds": wall,
               "best_valid_loss": summary["best_valid_loss"]}
        runs.append(run)
        print(f"  {processes} process(es) x {threads} thread(s): epochs "
              + ", ".join(f"{s:.2f}" for s in epoch_seconds)
              + f" s; {sum(run['samples_per_second']) / len(epochs):,.0f} samples/s; fit {wall:.1f} s; "
              f"best valid loss {summary['best_valid_loss']:.4f}", flush=True)
    mean = [sum(r["epoch_seconds"]) / len(r["epoch_seconds"]) for r in runs]
    print(f"mean epoch: {mean[0]:.2f} s on 1 process x 1 thread, {mean[1]:.2f} s on 1 x {runs[1]['threads_per_process']}, "
          f"{mean[2]:.2f} s on {args.processes} x {runs[2]['threads_per_process']}; fit wall "
          + " / ".join(f"{r['fit_wall_seconds']:.1f}" for r in runs) + " s")
    (OUT / "train_distributed.json").write_text(json.dumps({
        "model": args.model, "device": args.device, "users": args.users, "events_per_user": args.events_per_user,
        "training_rows": len(train), "cores": cores, "python": sys.version.split()[0],
        "torch": torch.__version__, "machine": platform.machine(), "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()

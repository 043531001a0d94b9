"""Training throughput of the sequence model on a synthetic log of ~10^7 events.

    .venv/bin/python bench/train_sequence.py [--users 100000] [--events-per-user 100]
                                             [--epochs 2] [--device auto|cpu|cuda]
                                             [--encoder transformer|gru] [--batch-size N]

Generates the synthetic log and its features once under bench/out/train_sequence/ (reused when
the same size is asked again; not timed), then trains the sequence model for --epochs epochs on
the chosen device (no early stopping) and prints one row per epoch: device, training rows, epoch
seconds (training + validation pass) and training samples per second; then the scoring speed on
the evaluation rows. Figures go to bench/out/train_sequence.json. Nothing is asserted about time.

Quick CPU check:  .venv/bin/python bench/train_sequence.py --users 2000 --epochs 1 --device cpu
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


def ensure_features(workdir: Path, users: int, events_per_user: float, sequence_length: int) -> tuple[Path, dict]:
    """Synthetic events -> {train,eval}.parquet, built once per size (not timed)."""
    import pyarrow.parquet as pq

    from uservalue.config import FeaturizeParams, SplitParams, SyntheticSource
    from uservalue.features.store import write_feature_sets
    from uservalue.data.sources.synthetic import generate

    tag = f"u{users}_e{events_per_user:g}_L{sequence_length}"
    events = workdir / f"events_u{users}_e{events_per_user:g}.parquet"
    features = workdir / f"features_{tag}"
    info: dict = {}
    if not events.exists():
        start = time.perf_counter()
        generate(SyntheticSource(users=users, events_per_user=events_per_user), events, workdir / f"truth_u{users}")
        info["generate_seconds"] = time.perf_counter() - start
    info["events"] = pq.ParquetFile(events).metadata.num_rows
    if not (features / "meta.json").exists():
        start = time.perf_counter()
        write_feature_sets(events, SplitParams(**SPLIT), FeaturizeParams(sequence_length=sequence_length),
                           BEHAVIORS, features)
        info["featurize_seconds"] = time.perf_counter() - start
    return features, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events-per-user", type=float, default=100.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--encoder", choices=["transformer", "gru"], default="transformer")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model's default")
    parser.add_argument("--sequence-length", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=OUT / "train_sequence")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from uservalue.features.sql import FeatureSpec
    from uservalue.models.base import FitContext
    from uservalue.models.deep.sequence import SequenceModel
    from uservalue.models.deep.runtime import resolve_device

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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    raw = {"max_epochs": args.epochs, "patience": args.epochs + 1, "encoder": args.encoder, "influence_rows": 2048}
    if args.batch_size:
        raw["batch_size"] = args.batch_size
    model = SequenceModel.from_config(raw, FeatureSpec.from_dict(meta["spec"]), meta["horizon_days"])

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
    print(f"\nfit total {fit_seconds:.1f} s (tensors + training + influence {summary.get('influence_seconds', 0):.1f} s); "
          f"scoring {len(evaluation):,} rows in {predict_seconds:.1f} s ({len(evaluation) / predict_seconds:,.0f} rows/s)")
    print(f"influence per behaviour: {model.influence()}")

    result = {
        "users": args.users, "events_per_user": args.events_per_user, **info,
        "device": device.type, "device_name": name, "encoder": args.encoder,
        "train_rows": summary["train_rows"], "valid_rows": summary["valid_rows"],
        "epochs": epochs, "fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
        "predict_rows": len(evaluation), "influence": model.influence(),
        "params": model.params.model_dump(mode="json"), "python": platform.python_version(),
        "torch": torch.__version__, "argv": sys.argv[1:],
    }
    out = OUT / "train_sequence.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Featurize benchmark: DuckDB `build_features` against the pandas reference on ~10^7 events.

    .venv/bin/python bench/featurize.py [--users 100000] [--events-per-user 100]
                                        [--workdir DIR] [--skip-pandas]

Generates a synthetic log (not timed; reused when --workdir already holds one of the same size),
then runs each implementation in its own child process so its peak RSS can be read on its own:
  duckdb  build_features(<parquet path>, 1997-10-01, label_end=+273 days) -> Arrow table
  pandas  pd.read_parquet(<parquet path>) + build_features_pandas(...)   -> DataFrame
Wall time is measured inside the child around exactly that work (interpreter start-up and imports
excluded); peak RSS is the child's whole-life high-water mark (ru_maxrss, imports included).

Prints a table and the targets (DuckDB >= 5x faster than pandas, < 15 s, < 3 GiB), and writes the
figures to bench/out/featurize.json. A missed target is reported, never an error exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CUTOFF = dt.datetime(1997, 10, 1, tzinfo=dt.UTC)
LABEL_END = CUTOFF + dt.timedelta(days=273)
OUT_JSON = Path(__file__).resolve().parent / "out" / "featurize.json"
TARGET_SPEEDUP = 5.0
TARGET_SECONDS = 15.0
TARGET_RSS_GIB = 3.0
GIB = 1024**3


def _run_child(implementation: str, events: Path) -> dict:
    """The timed work, run in a fresh interpreter (`--child`); returns its figures."""
    if implementation == "duckdb":
        from uservalue.features.sql import FeatureSpec, build_features

        start = time.perf_counter()
        table = build_features(events, CUTOFF, FeatureSpec(), label_end=LABEL_END)
        seconds = time.perf_counter() - start
        rows = table.num_rows
    elif implementation == "pandas":
        import pandas as pd

        from uservalue.features.sql import FeatureSpec
        from tests.support.reference_features import build_features_pandas

        columns = ["user_id", "ts", "behavior", "item_id", "category_id", "amount"]
        start = time.perf_counter()
        frame = build_features_pandas(
            pd.read_parquet(events, columns=columns), CUTOFF, FeatureSpec(), label_end=LABEL_END
        )
        seconds = time.perf_counter() - start
        rows = len(frame)
    else:
        raise ValueError(implementation)
    # Linux reports ru_maxrss in KiB.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"implementation": implementation, "seconds": seconds, "rows": rows,
            "peak_rss_bytes": peak}


def measure(implementation: str, events: Path) -> dict:
    """Run one implementation in a child process; peak RSS from the child's own rusage."""
    cmd = [sys.executable, str(Path(__file__).resolve()),
           "--child", implementation, "--events", str(events)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{implementation} child failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    # Cross-check: the parent's view of the same child (KiB on Linux).
    result["peak_rss_bytes"] = max(result["peak_rss_bytes"], usage.ru_maxrss * 1024)
    return result


def ensure_events(workdir: Path, users: int, events_per_user: float) -> tuple[Path, int, float]:
    """The synthetic log for this size: generated once per workdir."""
    import pyarrow.parquet as pq

    from uservalue.config import SyntheticSource
    from uservalue.data.sources.synthetic import generate

    events = workdir / f"synthetic_u{users}_e{events_per_user:g}.parquet"
    if events.exists():
        return events, pq.ParquetFile(events).metadata.num_rows, 0.0
    start = time.perf_counter()
    result = generate(
        SyntheticSource(users=users, events_per_user=events_per_user),
        events,
        workdir / f"truth_u{users}_e{events_per_user:g}",
    )
    return events, result.events, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events-per-user", type=float, default=100.0,
                        help="mean non-purchase events per user (purchases come on top)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the log goes (default: a temp dir, removed afterwards)")
    parser.add_argument("--skip-pandas", action="store_true", help="time DuckDB only")
    parser.add_argument("--child", choices=["duckdb", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_run_child(args.child, args.events)), flush=True)
        return

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="featurize-bench-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        events, n_events, gen_seconds = ensure_events(workdir, args.users, args.events_per_user)
        size_mib = events.stat().st_size / 2**20
        print(f"events: {n_events:,} ({args.users:,} users), {size_mib:.0f} MiB Parquet at {events}"
              + (f", generated in {gen_seconds:.1f} s (not timed)" if gen_seconds else ", reused"))
        print(f"cutoff {CUTOFF.date()}, label_end {LABEL_END.date()}; {os.cpu_count()} CPUs\n",
              flush=True)

        results = {"duckdb": measure("duckdb", events)}
        if not args.skip_pandas:
            results["pandas"] = measure("pandas", events)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    duck = results["duckdb"]
    pandas_result = results.get("pandas")
    speedup = pandas_result["seconds"] / duck["seconds"] if pandas_result else None

    print(f"{'implementation':<16}{'wall s':>10}{'peak RSS GiB':>15}{'rows out':>12}")
    for name, r in results.items():
        print(f"{name:<16}{r['seconds']:>10.2f}{r['peak_rss_bytes'] / GIB:>15.2f}{r['rows']:>12,}")
    print(f"\nspeed ratio pandas/DuckDB: {f'{speedup:.1f}x' if speedup else 'n/a (--skip-pandas)'}")

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    targets = {
        f"DuckDB >= {TARGET_SPEEDUP:g}x faster than pandas":
            None if speedup is None else speedup >= TARGET_SPEEDUP,
        f"DuckDB wall < {TARGET_SECONDS:g} s": duck["seconds"] < TARGET_SECONDS,
        f"DuckDB peak RSS < {TARGET_RSS_GIB:g} GiB": duck["peak_rss_bytes"] / GIB < TARGET_RSS_GIB,
    }
    print("\ntargets:")
    for target, ok in targets.items():
        print(f"  {target:<40}{verdict(ok)}")
    if pandas_result and pandas_result["rows"] != duck["rows"]:
        print(f"\nwarning: row counts differ "
              f"(duckdb {duck['rows']}, pandas {pandas_result['rows']})")

    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(
        {
            "users": args.users,
            "events_per_user": args.events_per_user,
            "events": n_events,
            "parquet_mib": round(size_mib, 1),
            "cutoff": CUTOFF.isoformat(),
            "label_end": LABEL_END.isoformat(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "results": {
                name: {"seconds": round(r["seconds"], 3),
                       "peak_rss_gib": round(r["peak_rss_bytes"] / GIB, 3),
                       "rows": r["rows"]}
                for name, r in results.items()
            },
            "speedup_pandas_over_duckdb": None if speedup is None else round(speedup, 2),
            "targets": {k: verdict(ok) for k, ok in targets.items()},
        },
        indent=2,
    ) + "\n")
    print(f"\nwrote {OUT_JSON}")


if __name__ == "__main__":
    main()

"""Featurize engines benchmark (issue 14 §4): the featurize stage on DuckDB and on Spark `local[2]`.

    .venv/bin/python bench/engines.py [--users 100000] [--events-per-user 100] [--workdir DIR]
                                      [--cores 2] [--driver-memory 4g]

Generates a synthetic log (not timed; reused when --workdir already holds one of the same size),
then runs the featurize stage (every cutoff of params.yaml's split, with labels, written to Parquet)
once per engine, each in its own child process:
  duckdb  features.store.write_feature_sets           (DuckDB threads = --cores)
  spark   features.spark.write_feature_sets_spark     (master local[<cores>], the session included)
Wall time is measured in the child around the stage call (for Spark: session start-up included, as
the stage pays it; the JVM start is reported apart). Peak RSS is sampled every 0.1 s over the child's
whole process tree (the Python process plus Spark's JVM), psutil. Spark's shuffle stages are counted
from its monitoring REST API: completed stages that wrote shuffle data.

Prints a table and the ratio, and writes bench/out/engines.json. Spark is expected to be slower on
one machine: the figure says by how much. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
OUT_JSON = Path(__file__).resolve().parent / "out" / "engines.json"
GIB = 1024**3


def _stage_args(events: Path):
    from uservalue.config import load_params
    from uservalue.data.window import resolve_split_for

    params = load_params(ROOT / "params.yaml")
    split, _observed = resolve_split_for(params.split, params.data, params.validate_, events)  # split `auto`
    return split, params.featurize, params.data.behaviors


def _shuffle_stages(spark) -> int:
    """Completed stages that wrote shuffle data (Spark's monitoring REST API of this application)."""
    url = f"{spark.sparkContext.uiWebUrl}/api/v1/applications/{spark.sparkContext.applicationId}/stages"
    with urllib.request.urlopen(url, timeout=30) as response:
        stages = json.load(response)
    return sum(1 for s in stages if s.get("status") == "COMPLETE" and s.get("shuffleWriteBytes", 0) > 0)


def _run_child(engine: str, events: Path, out_dir: Path, cores: int, driver_memory: str) -> dict:
    """The timed work, in a fresh interpreter (`--child`)."""
    split, featurize, behaviors = _stage_args(events)
    result: dict = {"engine": engine}
    if engine == "duckdb":
        from uservalue.features.store import write_feature_sets

        start = time.perf_counter()
        rows = write_feature_sets(events, split, featurize.model_copy(update={"threads": cores}), behaviors, out_dir)
        result["seconds"] = time.perf_counter() - start
    else:
        from uservalue.config import SparkParams
        from uservalue.features.spark import spark_session, write_feature_sets_spark

        params = SparkParams(master=f"local[{cores}]", driver_memory=driver_memory,
                             config={"spark.sql.shuffle.partitions": str(4 * cores), "spark.ui.enabled": "true"})
        start = time.perf_counter()
        spark = spark_session(params, "uservalue-bench")
        spark.sparkContext.setLogLevel("ERROR")
        result["session_seconds"] = time.perf_counter() - start
        rows = write_feature_sets_spark(events, split, featurize, behaviors, out_dir, params, spark=spark)
        result["seconds"] = time.perf_counter() - start
        result["shuffle_stages"] = _shuffle_stages(spark)
        spark.stop()
    result["rows"] = rows
    return result


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(engine: str, events: Path, out_dir: Path, cores: int, driver_memory: str) -> dict:
    """Run one engine in a child process; peak RSS of its process tree, sampled."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--events", str(events),
           "--out-dir", str(out_dir), "--cores", str(cores), "--driver-memory", driver_memory]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    watched = psutil.Process(proc.pid)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, _tree_rss(watched))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{engine} child failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_bytes"] = peak
    return result


def ensure_events(workdir: Path, users: int, events_per_user: float) -> tuple[Path, int]:
    import pyarrow.parquet as pq

    from uservalue.config import SyntheticSource
    from uservalue.data.sources.synthetic import generate

    events = workdir / f"synthetic_u{users}_e{events_per_user:g}.parquet"
    if not events.exists():
        generate(SyntheticSource(users=users, events_per_user=events_per_user), events,
                 workdir / f"truth_u{users}_e{events_per_user:g}")
    return events, pq.ParquetFile(events).metadata.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events-per-user", type=float, default=100.0,
                        help="mean non-purchase events per user (purchases come on top)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the log goes (default: a temp dir, removed afterwards)")
    parser.add_argument("--cores", type=int, default=2, help="DuckDB threads and Spark local[N]")
    parser.add_argument("--driver-memory", default="4g", help="spark.driver.memory (local mode: all of Spark)")
    parser.add_argument("--child", choices=["duckdb", "spark"], help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_run_child(args.child, args.events, args.out_dir, args.cores, args.driver_memory)),
              flush=True)
        return

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="engines-bench-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        events, n_events = ensure_events(workdir, args.users, args.events_per_user)
        print(f"events: {n_events:,} ({args.users:,} users) at {events}; {os.cpu_count()} CPUs, "
              f"engines on {args.cores}\n", flush=True)
        results = {engine: measure(engine, events, workdir / f"features_{engine}", args.cores, args.driver_memory)
                   for engine in ("duckdb", "spark")}
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    duck, spark = results["duckdb"], results["spark"]
    print(f"{'engine':<10}{'wall s':>10}{'peak RSS GiB':>15}{'rows out (train, eval)':>28}")
    for name, r in results.items():
        rows = ", ".join(f"{n:,}" for n in r["rows"].values())
        print(f"{name:<10}{r['seconds']:>10.1f}{r['peak_rss_bytes'] / GIB:>15.2f}{rows:>28}")
    ratio = spark["seconds"] / duck["seconds"]
    print(f"\nSpark / DuckDB wall time: {ratio:.1f}x (Spark session start {spark['session_seconds']:.1f} s "
          f"included); peak RSS {spark['peak_rss_bytes'] / max(duck['peak_rss_bytes'], 1):.1f}x; "
          f"Spark shuffle stages: {spark['shuffle_stages']}")
    if duck["rows"] != spark["rows"]:
        print(f"warning: row counts differ (duckdb {duck['rows']}, spark {spark['rows']})")

    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps({
        "users": args.users, "events_per_user": args.events_per_user, "events": n_events,
        "cores": args.cores, "cpus": os.cpu_count(), "python": platform.python_version(),
        "results": {name: {"seconds": round(r["seconds"], 2), "peak_rss_gib": round(r["peak_rss_bytes"] / GIB, 3),
                           "rows": r["rows"], **({"session_seconds": round(r["session_seconds"], 2),
                                                  "shuffle_stages": r["shuffle_stages"]} if name == "spark" else {})}
                    for name, r in results.items()},
        "spark_over_duckdb_seconds": round(ratio, 2),
    }, indent=2) + "\n")
    print(f"\nwrote {OUT_JSON}")


if __name__ == "__main__":
    main()

"""Benchmark the Taobao reader on a generated UserBehavior CSV (figures printed, never asserted).

    python bench/ingest.py                      # ~10^7 rows (10^5 users x 100 events)

The CSV is generated first (not timed); then `uservalue.data.sources.ingest` with source=taobao runs
in a child process: parse, map, type-check every row, then sort by user and time with DuckDB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _ingest(csv: str, workdir: str, queue: mp.Queue) -> None:
    from uservalue.config import DataParams
    from uservalue.data.sources import ingest

    started = time.perf_counter()
    result = ingest(DataParams(source="taobao", path=csv), Path(workdir) / "events.parquet", Path(workdir) / "t")
    queue.put({"events": result.events, "wall_s": time.perf_counter() - started,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events-per-user", type=float, default=100.0)
    args = parser.parse_args()
    from uservalue.config import SyntheticSource
    from uservalue.data.sources.synthetic import generate
    from uservalue.data.sources.taobao import export_taobao_csv

    workdir = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        generate(SyntheticSource(users=args.users, events_per_user=args.events_per_user),
                 workdir / "synthetic.parquet", workdir / "truth")
        csv = workdir / "UserBehavior.csv"
        rows = export_taobao_csv(workdir / "synthetic.parquet", csv)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_ingest, args=(str(csv), str(workdir), queue))
        child.start()
        figures = queue.get()
        child.join()
    finally:
        csv_gib = (workdir / "UserBehavior.csv").stat().st_size / 1024**3
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"taobao CSV    {rows:>14,} rows, {csv_gib:.2f} GiB")
    print(f"ingest wall   {figures['wall_s']:>12.1f} s   ({figures['events'] / figures['wall_s'] / 1e6:.2f} M rows/s)")
    print(f"peak RSS      {figures['peak_rss_gib']:>12.2f} GiB")
    out = Path(__file__).parent / "out" / "ingest_taobao.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "csv_gib": csv_gib, **figures}, indent=2))


if __name__ == "__main__":
    main()

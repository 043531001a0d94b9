"""Benchmark the synthetic generator: events/s and peak RSS (figures printed, never asserted).

    python bench/generate.py                       # 10^7 events (10^5 users x 100)
    python bench/generate.py --users 1000000       # 10^8 events: memory must stay flat

Target (issue 2): 10^7 events well under a minute; 10^8 without running out of memory
(peak RSS bounded by `chunk_events`, not by the size of the log).
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


def _child(users: int, events_per_user: float, chunk_events: int, workdir: str, queue: mp.Queue) -> None:
    from uservalue.config import SyntheticSource
    from uservalue.data.sources.synthetic import generate

    cfg = SyntheticSource(users=users, events_per_user=events_per_user, chunk_events=chunk_events)
    started = time.perf_counter()
    result = generate(cfg, Path(workdir) / "events.parquet", Path(workdir) / "truth")
    wall = time.perf_counter() - started
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    queue.put({"events": result.events, "users": users, "wall_s": wall, "peak_rss_gib": peak_gib,
               "file_gib": (Path(workdir) / "events.parquet").stat().st_size / 1024**3,
               "chunk_events": chunk_events})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events-per-user", type=float, default=100.0)
    parser.add_argument("--chunk-events", type=int, default=2_000_000)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="generate-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    queue: mp.Queue = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(
        target=_child, args=(args.users, args.events_per_user, args.chunk_events, str(workdir), queue)
    )
    child.start()
    figures = queue.get()
    child.join()
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    rate = figures["events"] / figures["wall_s"]
    print(f"events        {figures['events']:>14,}")
    print(f"users         {figures['users']:>14,}")
    print(f"wall          {figures['wall_s']:>12.1f} s   ({rate / 1e6:.2f} M events/s)")
    print(f"peak RSS      {figures['peak_rss_gib']:>12.2f} GiB (chunk_events={figures['chunk_events']:,})")
    print(f"parquet size  {figures['file_gib']:>12.2f} GiB")
    out = Path(__file__).parent / "out" / f"generate_{figures['events']}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**figures, "events_per_s": rate}, indent=2))


if __name__ == "__main__":
    main()

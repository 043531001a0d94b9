"""Online store benchmark: materialize N synthetic users, then read users back by id.

    .venv/bin/python bench/materialize.py [--users 100000] [--events-per-user 100] [--workdir DIR]
                                          [--backends sqlite redis] [--redis-url URL]
                                          [--batch-events 500000]

Generates a synthetic log (`uservalue.data.sources.synthetic.generate`; not timed, reused when
--workdir already holds one of the same size), then, per backend (default SQLite; Redis: the
server at --redis-url, else a throw-away redis-server started on 127.0.0.1):
  materialize  `uservalue.lifecycle.materialize.materialize` in a child process: wall time and the
               child's peak RSS (ru_maxrss, imports included), store size (state bytes; SQLite file
               or Redis used_memory)
  get          `store.get(ids)` for 1 id (p50/p99 of 2,000 calls) and 1,000 ids (p50 of 50 calls),
               random known users; and its parts: decode of the fetched state alone, and
               `online_features` on the result (what a by-id request adds before the model)
Prints a table and writes bench/out/materialize.json. Figures are reported, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT_JSON = Path(__file__).resolve().parent / "out" / "materialize.json"
AS_OF = dt.datetime(1998, 7, 1, tzinfo=dt.UTC)
GIB = 1024**3


def _child(events: Path, url: str, batch_events: int) -> dict:
    from uservalue.config import MaterializeParams
    from uservalue.lifecycle.materialize import materialize
    from uservalue.serving.store import open_store

    with open_store(url) as store:
        start = time.perf_counter()
        result = materialize(events, store, MaterializeParams(batch_events=batch_events))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "users": result.users, "events": result.events, "state_bytes": result.store.bytes,
            "backend_bytes": result.store.backend_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_materialize(events: Path, url: str, batch_events: int) -> dict:
    """The materialization in a fresh interpreter; its own peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--events", str(events), "--url", url,
           "--batch-events", str(batch_events)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"materialize child failed ({os.waitstatus_to_exitcode(status)})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_bytes"] = max(result["peak_rss_bytes"], usage.ru_maxrss * 1024)
    return result


def timed(fn, repeat: int) -> np.ndarray:
    out = np.empty(repeat)
    for i in range(repeat):
        start = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - start
    return out * 1000  # ms


def measure_get(url: str, users: np.ndarray, seed: int = 0) -> dict:
    from uservalue.features.online import online_features
    from uservalue.features.sql import FeatureSpec
    from uservalue.serving.store import open_store
    from uservalue.serving.store_codec import decode_users

    rng = np.random.default_rng(seed)
    one = [str(u) for u in rng.choice(users, 2000)]
    many = [[str(u) for u in rng.choice(users, 1000, replace=False)] for _ in range(50)]
    figures: dict = {}
    with open_store(url) as store:
        store.get(one[:10])  # warm: connection, statement cache
        it = iter(one)
        figures["get_1_ms"] = timed(lambda: store.get([next(it)]), len(one))
        it_many = iter(many)
        figures["get_1000_ms"] = timed(lambda: store.get(next(it_many)), len(many))
        blob1, blobs = store._read(one[:1]), store._read(many[0])
        figures["decode_1_ms"] = timed(lambda: decode_users(one[:1], blob1), 2000)
        figures["decode_1000_ms"] = timed(lambda: decode_users(many[0], blobs), 50)
        ev1, ev1000 = store.get(one[:1])[0], store.get(many[0])[0]
        spec = FeatureSpec()
        figures["features_1_ms"] = timed(lambda: online_features(ev1, AS_OF, spec), 500)
        figures["features_1000_ms"] = timed(lambda: online_features(ev1000, AS_OF, spec), 20)
        figures["events_per_user"] = len(ev1000) / 1000
    out = {}
    for name, values in figures.items():
        if isinstance(values, np.ndarray):
            out[name] = {"p50": round(float(np.percentile(values, 50)), 4),
                         "p99": round(float(np.percentile(values, 99)), 4)}
        else:
            out[name] = round(values, 1)
    return out


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("--redis needs redis-server (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port)
    for _ in range(300):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def ensure_events(workdir: Path, users: int, events_per_user: float) -> tuple[Path, float]:
    from uservalue.config import SyntheticSource
    from uservalue.data.sources.synthetic import generate

    events = workdir / f"synthetic_u{users}_e{events_per_user:g}.parquet"
    if events.exists():
        return events, 0.0
    start = time.perf_counter()
    generate(SyntheticSource(users=users, events_per_user=events_per_user), events,
             workdir / f"truth_u{users}_e{events_per_user:g}")
    return events, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events-per-user", type=float, default=100.0,
                        help="mean non-purchase events per user (purchases come on top)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir, removed afterwards")
    parser.add_argument("--batch-events", type=int, default=500_000)
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "redis"], default=["sqlite"])
    parser.add_argument("--redis-url", help="Redis server to use (its namespace 'uservalue' is replaced); "
                                            "default: a throw-away local redis-server")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.events, args.url, args.batch_events)), flush=True)
        return

    import pyarrow.parquet as pq

    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="materialize-bench-")) if own else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    results: dict[str, dict] = {}
    try:
        events, gen_seconds = ensure_events(workdir, args.users, args.events_per_user)
        n_events = pq.ParquetFile(events).metadata.num_rows
        print(f"events: {n_events:,} ({args.users:,} users), {events.stat().st_size / 2**20:.0f} MiB Parquet"
              + (f", generated in {gen_seconds:.1f} s (not timed)" if gen_seconds else ", reused")
              + f"; {os.cpu_count()} CPUs", flush=True)
        users = pq.read_table(events, columns=["user_id"]).column("user_id").unique().to_numpy(zero_copy_only=False)
        backends = {"sqlite": f"sqlite:///{workdir / 'store.sqlite'}"} if "sqlite" in args.backends else {}
        if "redis" in args.backends:
            if args.redis_url:
                backends["redis"] = args.redis_url
            else:
                server, backends["redis"] = start_redis(workdir)
        for name, url in backends.items():
            if name == "sqlite":
                for leftover in workdir.glob("store.sqlite*"):
                    leftover.unlink()
            print(f"{name}: materialize ...", flush=True)
            results[name] = run_materialize(events, url, args.batch_events)
            results[name].update(measure_get(url, users))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        if own:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'backend':<8}{'mat. s':>8}{'peak RSS GiB':>14}{'state MiB':>11}{'backend MiB':>13}"
          f"{'get 1 p50/p99 ms':>18}{'get 1000 p50 ms':>17}{'decode 1/1000 ms':>18}{'features 1/1000 ms':>20}")
    for name, r in results.items():
        print(f"{name:<8}{r['seconds']:>8.1f}{r['peak_rss_bytes'] / GIB:>14.2f}{r['state_bytes'] / 2**20:>11.0f}"
              f"{r['backend_bytes'] / 2**20:>13.0f}"
              f"{r['get_1_ms']['p50']:>9.3f}/{r['get_1_ms']['p99']:<8.3f}{r['get_1000_ms']['p50']:>17.1f}"
              f"{r['decode_1_ms']['p50']:>9.3f}/{r['decode_1000_ms']['p50']:<8.1f}"
              f"{r['features_1_ms']['p50']:>11.2f}/{r['features_1000_ms']['p50']:<8.1f}")
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps({
        "users": args.users, "events_per_user_param": args.events_per_user, "events": n_events,
        "batch_events": args.batch_events, "cpus": os.cpu_count(),
        "results": {name: {**{k: v for k, v in r.items() if k != "peak_rss_bytes"},
                           "peak_rss_gib": round(r["peak_rss_bytes"] / GIB, 3), "seconds": round(r["seconds"], 2)}
                    for name, r in results.items()},
    }, indent=2) + "\n")
    print(f"\nwrote {OUT_JSON}")


if __name__ == "__main__":
    main()

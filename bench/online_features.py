"""Online features benchmark: the numpy engine (uservalue.features.online) against the DuckDB SQL.

    .venv/bin/python bench/online_features.py [--users 1000] [--events-per-user 100] [--repeats 200]

Generates a synthetic log (not timed), then times, as the median of repeats:
  numpy   online_features(EventColumns, as_of, spec)          (no SQL at request time)
  duckdb  build_features(<pyarrow table>, as_of, spec, con=…)  (one long-lived connection)
for one user with about `--events-per-user` events and for all users at once. Also prints the
one-off cost of event_columns (DuckDB's epoch and hash, paid when events enter the store).
Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uservalue.config import SyntheticSource
from uservalue.data.sources.synthetic import generate
from uservalue.features.online import event_columns, online_features
from uservalue.features.sql import FeatureSpec, build_features, connect

AS_OF = dt.datetime(1998, 7, 1, tzinfo=dt.UTC)  # after the synthetic calendar: every event counts


def median_ms(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up (imports, caches, DuckDB's first plan)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def agreement(online: pa.Table, sql: pa.Table) -> str:
    """How far apart the two tables are: non-float columns equal? the largest relative float gap."""
    exact, worst = online.schema.equals(sql.schema) and online.num_rows == sql.num_rows, 0.0
    for name in sql.column_names:
        got, want = online.column(name), sql.column(name)
        if pa.types.is_floating(want.type):
            x, y = got.to_numpy(), want.to_numpy()
            gap = np.abs(x - y) / np.maximum(np.abs(y), np.finfo(float).tiny)
            worst = max(worst, float(gap.max(initial=0.0)))
        else:
            exact = exact and got.equals(want)
    return f"{'exact' if exact else 'DIFFERENT'}, floats within {worst:.0e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--events-per-user", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=200, help="for one user; a tenth of it for all")
    args = parser.parse_args()

    spec = FeatureSpec()
    with tempfile.TemporaryDirectory(prefix="online-bench-") as tmp:
        out = Path(tmp) / "events.parquet"
        generate(SyntheticSource(users=args.users, events_per_user=args.events_per_user, seed=1), out,
                 Path(tmp) / "truth")
        table = pq.read_table(out)

    start = time.perf_counter()
    columns = event_columns(table)
    load_ms = (time.perf_counter() - start) * 1e3
    ids, counts = np.unique(columns.user_id, return_counts=True)
    one_id = ids[np.argmin(np.abs(counts - args.events_per_user))]
    one_table = table.filter(pc.equal(table.column("user_id"), pa.scalar(one_id)))
    one = columns.take(columns.user_id == one_id)

    con = connect()
    cases = [("1 user", one_table, one, args.repeats),
             (f"{len(ids):,} users", table, columns, max(args.repeats // 10, 3))]
    print(f"{len(table):,} events of {len(ids):,} users; as_of {AS_OF.date()}; default spec "
          f"(L={spec.sequence_length}, windows {spec.windows_days}); {os.cpu_count()} CPUs")
    print(f"event_columns (once, when events are loaded): {load_ms:.1f} ms for all events\n")
    print(f"{'case':>14} {'events':>8} {'numpy ms':>10} {'duckdb ms':>10} {'speed-up':>9}  agreement")
    for name, events_table, events, repeats in cases:
        numpy_ms = median_ms(lambda e=events: online_features(e, AS_OF, spec), repeats)
        duck_ms = median_ms(lambda t=events_table: build_features(t, AS_OF, spec, con=con), repeats)
        same = agreement(online_features(events, AS_OF, spec), build_features(events_table, AS_OF, spec, con=con))
        print(f"{name:>14} {len(events):>8,} {numpy_ms:>10.3f} {duck_ms:>10.2f} {duck_ms / numpy_ms:>8.0f}x  {same}")
    con.close()


if __name__ == "__main__":
    main()

"""Feast 0.67 (local provider, SQLite online store) against the project's own online store, reading the same
per-user state (issue 15: use Feast if it meets the serving targets).

    python bench/feast_compare.py [--project DIR] [--users 5000] [--repeats 2000] [--feast-path DIR]

The per-user state is what the materialize stage wrote: one compact binary record per user
(`uservalue.serving.store_codec`). The same records go into a Feast feature view (one `Bytes` field,
entity `user_id`) materialized into Feast's SQLite online store (`write_to_online_store`), in a
temporary Feast repository. Then, for one user and for 1,000 users at a time, the p50 and p90 of:
our store's `get` (read and decode the events) and Feast's `get_online_features(...).to_dict()`
followed by the same decode. Nothing is asserted; figures go to bench/out/feast_compare.json.

Feast is not a dependency of the project (it would not serve faster, see the figures in the README):
install it apart, e.g. `pip install --target /tmp/feastlib feast==0.67.0`, and pass `--feast-path
/tmp/feastlib` (appended to sys.path, so the project's own versions of shared packages win).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def _times(call: Callable[[], object], repeats: int) -> dict[str, float]:
    for _ in range(min(50, repeats)):
        call()
    spent = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        spent.append((time.perf_counter() - started) * 1e3)
    return {"p50_ms": statistics.median(spent), "p90_ms": float(np.percentile(spent, 90)), "calls": repeats}


def _stored_states(path: Path, users: int) -> tuple[list[str], list[bytes]]:
    """The first `users` user ids of the SQLite store's current generation and their state records."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT user_id, state FROM current_users ORDER BY user_id LIMIT ?", (users,)).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows], [bytes(r[1]) for r in rows]


def _feast_store(repo: Path, ids: list[str], states: list[bytes]) -> tuple[Any, float]:
    """A Feast repository in `repo` whose online store (SQLite) holds the states, materialized."""
    import pandas as pd
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.types import Bytes

    (repo / "data").mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(
        "project: uservalue_bench\nprovider: local\nregistry: data/registry.db\n"
        "online_store:\n  type: sqlite\n  path: data/online.db\nentity_key_serialization_version: 3\n")
    now = dt.datetime.now(dt.UTC)
    frame = pd.DataFrame({"user_id": ids, "state": states, "event_timestamp": [now] * len(ids)})
    frame.to_parquet(repo / "data" / "states.parquet", index=False)
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
    view = FeatureView(name="user_state", entities=[user], ttl=None, online=True,
                       schema=[Field(name="state", dtype=Bytes)],
                       source=FileSource(path=str(repo / "data" / "states.parquet"), timestamp_field="event_timestamp"))
    store = FeatureStore(repo_path=str(repo))
    store.apply([user, view])
    started = time.perf_counter()
    for start in range(0, len(frame), 10_000):
        store.write_to_online_store("user_state", frame.iloc[start:start + 10_000])
    return store, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=ROOT, help="project root after `make run` (default: this one)")
    parser.add_argument("--users", type=int, default=5000, help="users copied into Feast's online store")
    parser.add_argument("--repeats", type=int, default=2000, help="reads of one user (a tenth for 1,000 users)")
    parser.add_argument("--feast-path", type=Path, default=None, help="where Feast is installed, if not in this venv")
    args = parser.parse_args()
    if args.feast_path is not None:
        sys.path.append(str(args.feast_path))
    root = args.project.resolve()
    os.environ["USERVALUE_PROJECT_DIR"] = str(root)

    from uservalue.serving.settings import open_configured_store, serve_settings
    from uservalue.serving.store_codec import decode_users

    ours = open_configured_store(serve_settings())
    if ours.backend != "sqlite":
        raise SystemExit(f"expected the project's SQLite store, got {ours.url}")
    ids, states = _stored_states(ours.path, args.users)  # type: ignore[attr-defined]
    results: dict[str, object] = {"when": dt.datetime.now(dt.UTC).isoformat(), "project": str(root),
                                  "users_in_feast": len(ids), "load_average": os.getloadavg()}
    one, many = ids[len(ids) // 2], ids[:1000]
    results["ours"] = {"1_user": _times(lambda: ours.get([one]), args.repeats),
                       "1000_users": _times(lambda: ours.get(many), max(args.repeats // 10, 5))}
    print(f"ours: {results['ours']}", flush=True)
    try:
        import feast
    except ImportError as error:
        results["feast"] = {"error": f"feast is not importable: {error}"}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            store, write_s = _feast_store(Path(tmp), ids, states)

            def read(users: list[str]) -> object:
                answer = store.get_online_features(features=["user_state:state"],
                                                   entity_rows=[{"user_id": u} for u in users]).to_dict()
                return decode_users(answer["user_id"], answer["state"])

            back = read(many)
            expected = ours.get(many)[0]
            same = bool(np.array_equal(back.t, expected.t) and np.array_equal(back.user_id, expected.user_id))
            results["feast"] = {"version": feast.__version__, "write_online_s": write_s, "same_events": same,
                                "1_user": _times(lambda: read([one]), args.repeats),
                                "1000_users": _times(lambda: read(many), max(args.repeats // 10, 5))}
        print(f"feast: {results['feast']}", flush=True)
    ours.close()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "feast_compare.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The materialize stage end to end: the entry script on a real log (CDNOW; the Taobao sample into a
real Redis) writes every user into the online store, and the features computed online from the stored
state equal the batch SQL's for sampled users. Also the event log folded in, and the exit codes."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tests.conftest import REPO_ROOT, utc
from tests.data.test_online_store import free_port, redis_server  # noqa: F401 - the fixture
from tests.e2e.conftest import run_in, tool_env
from uservalue.config import MaterializeParams
from uservalue.features.online import event_columns, online_features
from uservalue.features.sql import FeatureSpec, build_features
from uservalue.lifecycle.materialize import materialize
from uservalue.serving.event_log import EventLog
from uservalue.serving.store import ENV_URL, open_store

ENTRY = str(REPO_ROOT / "pipelines" / "materialize.py")
SPEC = FeatureSpec(windows_days=(7, 30, 365), sequence_length=20, category_buckets=31, item_buckets=257)


def run_stage(cwd: Path, params: Path, events: Path, *extra: str, check: bool = True, **env: str):
    environment = tool_env(**env)
    if ENV_URL not in env:
        environment.pop(ENV_URL, None)
    return run_in(cwd, sys.executable, ENTRY, "--params", str(params), "--events", str(events),
                  "--report", str(cwd / "reports" / "materialize.json"), *extra, check=check, env=environment)


def assert_online_equals_sql(store_url: str, events: Path, cutoffs: list[dt.datetime], sample: int = 300,
                             namespace: str = "uservalue") -> None:
    table = pq.read_table(events)
    users = np.unique(table.column("user_id").to_numpy(zero_copy_only=False))
    chosen = list(np.random.default_rng(0).choice(users, size=min(sample, len(users)), replace=False))
    with open_store(store_url, namespace=namespace) as store:
        stored, unknown = store.get([*chosen, "not-a-user"])
    assert unknown == ["not-a-user"]
    assert sorted(set(stored.user_id)) == sorted(chosen)
    subset = table.filter(pc.is_in(table.column("user_id"), pa.array(chosen)))
    for cutoff in cutoffs:
        want = build_features(subset, cutoff, SPEC)
        got = online_features(stored, cutoff, SPEC)
        assert got.schema.equals(want.schema) and got.num_rows == want.num_rows > 0
        for name in want.column_names:
            if pa.types.is_floating(want.schema.field(name).type):
                np.testing.assert_allclose(got.column(name).to_numpy(), want.column(name).to_numpy(), rtol=1e-9,
                                           err_msg=name)
            else:
                assert got.column(name).equals(want.column(name)), name


def test_entry_script_stores_every_cdnow_user_and_online_features_equal_sql(cdnow_events: Path, tmp_path: Path,
                                                                             write_params) -> None:
    url = f"sqlite:///{tmp_path / 'online' / 'store.sqlite'}"
    params = write_params({"serve.store.url": url, "materialize.batch_events": 5000})  # many batches
    done = run_stage(tmp_path, params, cdnow_events)
    report = json.loads((tmp_path / "reports" / "materialize.json").read_text())
    events = pq.read_metadata(cdnow_events).num_rows
    assert (report["users"], report["events"], report["backend"]) == (23_570, events, "sqlite")
    assert report["store"] == url and report["store_bytes"] > 0 and report["backend_bytes"] > 0
    assert "23,570 users" in done.stderr
    with open_store(url) as store:
        info = store.info()
    assert (info.users, info.events, info.generation) == (23_570, events, 1)
    assert_online_equals_sql(url, cdnow_events, [utc(1997, 4, 1), utc(1997, 10, 1), utc(1998, 7, 1)])

    run_stage(tmp_path, params, cdnow_events)  # again: a new generation replaces the first
    with open_store(url) as store:
        assert (store.info().generation, store.info().users) == (2, 23_570)


def test_entry_script_into_redis_and_its_exit_codes(redis_server: str, taobao_events: Path,  # noqa: F811
                                                    tmp_path: Path, write_params) -> None:
    params = write_params({"serve.store.namespace": "e2e"})
    run_stage(tmp_path, params, taobao_events, **{ENV_URL: redis_server})  # the environment names the store
    report = json.loads((tmp_path / "reports" / "materialize.json").read_text())
    users = len(set(pq.read_table(taobao_events, columns=["user_id"]).column("user_id").to_pylist()))
    assert (report["backend"], report["store"], report["users"]) == ("redis", redis_server, users)
    assert_online_equals_sql(redis_server, taobao_events, [utc(2017, 11, 30), utc(2017, 12, 4)], namespace="e2e")

    closed = f"redis://127.0.0.1:{free_port()}/0"
    down = run_stage(tmp_path, params, taobao_events, "--store-url", closed, check=False)
    assert down.returncode == 75 and "unreachable" in down.stderr, down.stderr
    missing = run_stage(tmp_path, params, tmp_path / "missing.parquet", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad = write_params({"serve.store.url": "postgres://db/x"}, name="bad.yaml")
    wrong = run_stage(tmp_path, bad, taobao_events, check=False)
    assert wrong.returncode == 2 and "serve.store.url" in wrong.stderr


def test_the_event_log_is_folded_in_with_its_ids(taobao_events: Path, tmp_path: Path) -> None:
    source = pq.read_table(taobao_events)

    def logged(rows: list[int], users: list[str], ids: list[str | None]) -> pa.Table:
        table = source.take(rows).set_column(0, "user_id", pa.array(users, pa.string()))
        return table.append_column("event_id", pa.array(ids, pa.string()))

    log_dir = tmp_path / "event_log"
    log = EventLog(log_dir, flush_records=100, flush_seconds=60)
    ingested = logged([0, 1], ["u1", "u1"], ["e1", "e2"])
    log.append(ingested)
    log.append(logged([2], ["u2"], ["e3"]))  # logged after the last ingest: not in the validated events
    log.flush()
    validated = tmp_path / "validated.parquet"
    pq.write_table(pa.concat_tables([source, ingested.drop_columns("event_id").cast(source.schema)]), validated)

    late = [logged([3], ["u3"], ["e4"])]

    def write_late(users: int, events: int) -> None:  # the service logs while the stage runs
        if late:
            log.append(late.pop())
            log.flush()

    with open_store(f"sqlite:///{tmp_path / 'store.sqlite'}") as store:
        result = materialize(validated, store, MaterializeParams(batch_events=1000), log_dir, progress=write_late)
        assert (result.logged_new, result.appended_after_switch) == (1, 1)
        users = len(set(source.column("user_id").to_pylist()))
        assert (result.users, store.info().users) == (users + 2, users + 3)
        got, unknown = store.get(["u1", "u2", "u3"])
        assert unknown == [] and got.user_id.tolist() == ["u1", "u1", "u2", "u3"]
        again = logged([0, 1, 2, 3, 4], ["u1", "u1", "u2", "u3", "u1"], ["e1", "e2", "e3", "e4", "e5"])
        # Every logged id is known to the store: only the new event counts.
        assert store.append(event_columns(again), again.column("event_id").to_pylist()) == 1
    log.close()

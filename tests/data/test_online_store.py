"""The online store against real backends: SQLite files in a temporary folder and a real redis-server
(started on a free port of 127.0.0.1 for the session, stopped with its process group). Also the event
log the service writes, and ingest reading it back."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uservalue.config import DataParams
from uservalue.data.sources import ingest
from uservalue.data.sources.event_log import EVENT_LOG_SCHEMA, event_log_files
from uservalue.errors import ConfigError, TransientError
from uservalue.features.online import EventColumns, concat, event_columns
from uservalue.serving.event_log import EventLog
from uservalue.serving.store import ENV_URL, OnlineStore, open_store, redact_url, store_url
from uservalue.serving.store_codec import FORMAT_VERSION, StoreFormatError, decode_users, encode_users

FIELDS = ("user_id", "t", "behavior", "item_id", "category_id", "amount", "item_hash", "category_hash")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on 127.0.0.1 (no persistence), its URL; stopped with its process group."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: the Redis store is tested against a real server "
                    "(apt-get install redis-server; .ci/run installs it)")
    import redis

    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    with open(folder / "redis.log", "wb") as log:
        process = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start: {(folder / 'redis.log').read_text()}")
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(params=["sqlite", "redis"])
def open_backend(request: pytest.FixtureRequest, tmp_path: Path):
    """Opens the test's store (SQLite: one file; Redis: one key namespace), as often as asked."""
    opened: list[OnlineStore] = []
    if request.param == "sqlite":
        url, namespace = f"sqlite:///{tmp_path / 'store.sqlite'}", "uservalue"
    else:
        url, namespace = request.getfixturevalue("redis_server"), f"test-{uuid.uuid4().hex[:8]}"

    def _open() -> OnlineStore:
        opened.append(open_store(url, namespace=namespace))
        return opened[-1]

    yield _open
    for store in opened:
        store.close()


@pytest.fixture
def store(open_backend) -> OnlineStore:
    return open_backend()


@pytest.fixture(scope="module")
def taobao_columns(taobao_events: Path) -> EventColumns:
    return event_columns(pq.read_table(taobao_events))


def users_of(events: EventColumns) -> list[str]:
    return list(dict.fromkeys(events.user_id.tolist()))


def only(events: EventColumns, users: list[str]) -> EventColumns:
    """The events of `users`, in that user order (each user's events in their order)."""
    return concat([events.take(events.user_id == u) for u in users])


def assert_same_events(got: EventColumns, want: EventColumns) -> None:
    assert len(got) == len(want)
    for name in FIELDS:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype, name
        if g.dtype == object:
            assert g.tolist() == w.tolist(), name
        else:  # bit for bit
            assert g.tobytes() == w.tobytes(), name


def test_state_encoding_round_trips_every_value_exactly() -> None:
    n = 6
    events = EventColumns(
        user_id=np.array(["ü", "a\x00b", "ü", "", "ü", "a\x00b"], dtype=object),
        t=np.array([0.1 + 0.2, -1.5e9, 1e-300, 2**53 + 0.0, 0.0, 7.25]),
        behavior=np.array(["view", "buy", "buy", "cart", "view", "fav"], dtype=object),
        item_id=np.array([None, "i\x001", "商品", "", "商品", None], dtype=object),
        category_id=np.array(["view", None, "c", None, "c", "c"], dtype=object),  # a value also used as a behaviour
        amount=np.array([0.0, 12.34, np.nextafter(1.0, 2.0), 0.0, 0.0, 5e-324]),
        item_hash=np.array([0, 2**64 - 1, 123, 5, 123, 0], dtype=np.uint64),
        category_hash=np.array([99, 0, 7, 0, 7, 7], dtype=np.uint64),
    )
    assert len(events) == n
    users, blobs = encode_users(events, event_ids=["e1", None, "e2", "x\x00y", None, None])
    assert users == ["ü", "a\x00b", ""]
    assert_same_events(decode_users(users, blobs), only(events, users))
    assert_same_events(decode_users(users[1:2], blobs[1:2]), only(events, ["a\x00b"]))
    assert_same_events(decode_users([], []), only(events, []))
    with pytest.raises(StoreFormatError):
        decode_users(["x"], [b"XX" + blobs[0][2:]])
    with pytest.raises(StoreFormatError):
        decode_users(["x"], [blobs[0][:40]])


def test_round_trip_by_id_with_unknown_ids(store: OnlineStore, taobao_columns: EventColumns) -> None:
    users = users_of(taobao_columns)
    assert store.info().generation is None
    nothing, unknown = store.get(users[:2])  # never materialized: all unknown
    assert len(nothing) == 0 and unknown == users[:2]
    thirds = [users[i::3] for i in range(3)]
    info = store.replace_all(only(taobao_columns, part) for part in thirds)
    assert (info.users, info.events, info.format_version) == (len(users), len(taobao_columns), FORMAT_VERSION)
    assert info.bytes > 0 and info.backend_bytes > 0 and info.materialized_at
    asked = [users[5], "no-such-user", users[0], users[5], *users[10:20], "другой"]
    got, unknown = store.get(asked)
    assert unknown == ["no-such-user", "другой"]
    assert_same_events(got, only(taobao_columns, [users[5], users[0], *users[10:20]]))
    everyone, unknown = store.get(users[::-1])
    assert unknown == []
    assert_same_events(everyone, only(taobao_columns, users[::-1]))
    empty, unknown = store.get([])
    assert len(empty) == 0 and unknown == []


def test_append_merges_new_events_and_counts_a_resent_event_once(store: OnlineStore,
                                                                 taobao_columns: EventColumns) -> None:
    users = users_of(taobao_columns)
    store.replace_all([only(taobao_columns, users[:5])])
    before = store.info()
    template = only(taobao_columns, [users[0]]).take(np.arange(4))
    sent = EventColumns(**{**{f: getattr(template, f) for f in FIELDS},
                           "user_id": np.array([users[0], users[0], "newcomer", users[0]], dtype=object),
                           "t": template.t + 86_400.0})
    # "e1" twice in one batch counts once; an event without an id always counts.
    assert store.append(sent, ["e1", "e1", "e1", None]) == 3
    assert store.append(sent, ["e1", "e1", "e1", None]) == 1
    assert store.append(sent.take(np.array([0, 2])), ["e1", "e1"]) == 0  # re-sent: already seen
    assert store.append(sent.take(np.array([1])), ["e2"]) == 1
    got, unknown = store.get([users[0], "newcomer", users[1]])
    assert unknown == []
    kept = sent.take(np.array([0, 3, 3, 1]))  # in arrival order: e1, None, None (again), e2
    assert_same_events(got, concat([only(taobao_columns, [users[0]]), kept, sent.take(np.array([2])),
                                    only(taobao_columns, [users[1]])]))
    after = store.info()
    assert (after.users, after.events) == (before.users + 1, before.events + 5)
    assert after.generation == before.generation


def test_append_to_a_store_never_materialized_creates_the_user(store: OnlineStore,
                                                               taobao_columns: EventColumns) -> None:
    first = taobao_columns.take(np.arange(3))
    assert store.append(first, ["a", "b", "c"]) == 3
    got, unknown = store.get([first.user_id[0]])
    assert unknown == []
    assert_same_events(got, first)
    assert (store.info().users, store.info().materialized_at) == (1, None)


def test_concurrent_appends_lose_nothing(open_backend, taobao_columns: EventColumns) -> None:
    """Two writers (own connections) append to the same users at once: every new event is kept once."""
    users = users_of(taobao_columns)
    open_backend().replace_all([only(taobao_columns, users[:3])])
    one = only(taobao_columns, [users[0]]).take(np.arange(1))

    def send(worker: int) -> int:
        store = open_backend()
        added = 0
        for i in range(15):
            batch = concat([one, EventColumns(**{**{f: getattr(one, f) for f in FIELDS},
                                                 "user_id": np.array([users[1]], dtype=object)})])
            added += store.append(batch, [f"w{worker}-{i}", "shared"])  # "shared": once per user, whoever wins
        return added

    with ThreadPoolExecutor(2) as pool:
        added = sum(pool.map(send, range(2)))
    assert added == 2 * 15 + 1
    got, _ = open_backend().get(users[:2])
    assert len(got) == len(only(taobao_columns, users[:2])) + added


def test_rematerialization_is_atomic_for_readers(open_backend, taobao_columns: EventColumns) -> None:
    writer, reader = open_backend(), open_backend()  # two connections, as materialize and the service
    users = users_of(taobao_columns)
    old, new = users[:30], users[10:]
    writer.replace_all([only(taobao_columns, old)])
    first = reader.info()

    def sees_old() -> None:
        got, unknown = reader.get(users)
        assert unknown == users[30:]
        assert_same_events(got, only(taobao_columns, old))

    with pytest.raises(RuntimeError, match="interrupted"), writer.materialize() as job:
        job.write_users(only(taobao_columns, new[:10]))
        sees_old()  # half written: invisible
        raise RuntimeError("interrupted")
    sees_old()
    left = reader.info()  # the aborted generation left nothing behind
    assert (left.generation, left.users, left.events, left.bytes) == (first.generation, first.users, first.events,
                                                                      first.bytes)
    assert backend_generations(writer) == [first.generation]

    with writer.materialize() as job:
        job.write_users(only(taobao_columns, new[:10]))
        sees_old()
        job.write_users(only(taobao_columns, new[10:]))
    got, unknown = reader.get(users)
    assert unknown == users[:10]
    assert_same_events(got, only(taobao_columns, new))
    now = reader.info()
    assert now.generation > first.generation and now.users == len(new)
    assert backend_generations(writer) == [now.generation]  # the old one is dropped


def backend_generations(store: OnlineStore) -> list[int]:
    """Generations whose data still exists in the backend."""
    if store.backend == "sqlite":
        con = sqlite3.connect(store.path)
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'users_g%'")]
        con.close()
        return sorted(int(n.removeprefix("users_g")) for n in names)
    keys = store._client.keys(f"{store.ns}:g[0-9]*")
    return sorted({int(k.decode().split(":")[1][1:]) for k in keys})


def test_a_user_written_twice_in_one_materialization_is_an_error(store: OnlineStore,
                                                                 taobao_columns: EventColumns) -> None:
    users = users_of(taobao_columns)
    part = only(taobao_columns, users[:2])
    with pytest.raises(ValueError, match="written twice"), store.materialize() as job:
        job.write_users(part)
        job.write_users(only(taobao_columns, users[1:3]))
    assert store.info().generation is None


def test_urls_errors_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TransientError, match="unreachable"):
        open_store(f"redis://127.0.0.1:{free_port()}/0")
    for bad in ("postgres://x/y", "sqlite://", "store.sqlite"):
        with pytest.raises(ConfigError):
            open_store(bad)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database, not at all" * 200)
    with pytest.raises(ConfigError, match="not an online store"):
        open_store(f"sqlite:///{tmp_path / 'junk.sqlite'}")
    relative = open_store("sqlite:///online/s.sqlite", root=tmp_path)
    assert relative.path == tmp_path / "online" / "s.sqlite" and relative.path.is_file()
    relative.close()
    assert redact_url("redis://:s3cret@cache:6380/2") == "redis://:***@cache:6380/2"
    assert redact_url("redis://user:s3cret@cache/0") == "redis://user:***@cache/0"
    monkeypatch.delenv(ENV_URL, raising=False)
    assert store_url("sqlite:///a.sqlite") == "sqlite:///a.sqlite"
    monkeypatch.setenv(ENV_URL, "redis://r:6379/1")
    assert store_url("sqlite:///a.sqlite") == "redis://r:6379/1"
    assert store_url("sqlite:///a.sqlite", override="sqlite:///b.sqlite") == "sqlite:///b.sqlite"


# --- the event log -------------------------------------------------------------------------------


def logged_events(source: pa.Table, rows: list[int], ids: list[str | None], users: list[str] | None = None) -> pa.Table:
    table = source.take(rows)
    if users is not None:
        table = table.set_column(0, "user_id", pa.array(users, pa.string()))
    return table.append_column("event_id", pa.array(ids, pa.string()))


def test_event_log_files_by_arrival_day_in_the_canonical_schema_plus_event_id(tmp_path: Path,
                                                                             taobao_events: Path) -> None:
    source = pq.read_table(taobao_events)
    log = EventLog(tmp_path / "log", flush_records=2, flush_seconds=60)
    day1, day2 = dt.datetime(2026, 3, 1, 23, 59, tzinfo=dt.UTC), dt.datetime(2026, 3, 2, 0, 1, tzinfo=dt.UTC)
    log.append(logged_events(source, [0, 1, 2], ["a", None, "c"]), received_at=day1)
    log.append(logged_events(source, [3], ["d"]).drop_columns("event_id").to_pandas(), received_at=day2)
    log.close()
    files = event_log_files(tmp_path / "log")
    assert [f.parent.name for f in files] == ["date=2026-03-01", "date=2026-03-01", "date=2026-03-02"]
    back = pa.concat_tables(pq.read_table(f) for f in files)
    assert back.schema.equals(EVENT_LOG_SCHEMA)
    assert back.drop_columns("event_id").to_pylist() == source.take([0, 1, 2, 3]).to_pylist()
    assert back.column("event_id").to_pylist() == ["a", None, "c", None]
    assert log.written == 4


def test_ingest_appends_the_event_log_once_per_user_and_event_id(tmp_path: Path, taobao_sample: Path) -> None:
    plain = tmp_path / "plain.parquet"
    ingest(DataParams(source="taobao", path=str(taobao_sample)), plain, tmp_path / "truth")
    source = pq.read_table(plain)
    log = EventLog(tmp_path / "log", flush_records=1000, flush_seconds=60)
    sent = logged_events(source, [0, 1, 2, 3], ["e1", "e2", "e1", None], users=["u1", "u1", "u2", "u1"])
    log.append(sent)
    log.append(logged_events(source, [0, 3], ["e1", None], users=["u1", "u1"]))  # a resent event, one without id
    log.close()
    out = tmp_path / "events.parquet"
    ingest(DataParams(source="taobao", path=str(taobao_sample), event_log=str(tmp_path / "log")), out,
           tmp_path / "truth")
    merged = pq.read_table(out)
    assert merged.schema.equals(source.schema)
    added = merged.filter(pa.compute.is_in(merged.column("user_id"), pa.array(["u1", "u2"])))
    assert added.num_rows == 5  # e1 and e2 of u1, e1 of u2, and both events without an id
    assert merged.num_rows == source.num_rows + 5
    missing = DataParams(source="taobao", path=str(taobao_sample), event_log=str(tmp_path / "none"))
    ingest(missing, tmp_path / "again.parquet", tmp_path / "truth")
    assert pq.read_table(tmp_path / "again.parquet").num_rows == source.num_rows

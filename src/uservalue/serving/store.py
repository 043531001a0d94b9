"""The online store: each user's canonical events by user id, in SQLite (default) or Redis, written in
generations switched atomically; the binary layout per user is in docs/online.md."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import struct
import threading
from abc import ABC, abstractmethod
from itertools import chain
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd

from uservalue.errors import ConfigError, TransientError
from uservalue.features.online import EventColumns, concat

FORMAT_VERSION = 1
MAGIC = b"UV"
HEADER = struct.Struct("<2sBBIIIII8x")
RECORD = np.dtype([("t", "<f8"), ("amount", "<f8"), ("behavior", "u1"), ("item", "<u4"), ("category", "<u4")])
NULL_INDEX = np.uint32(0xFFFFFFFF)
TEXT_OFFSETS, IDS_OFFSETS = 1, 2
ENV_URL = "USERVALUE_STORE_URL"
DEFAULT_URL = "sqlite:///data/online/store.sqlite"


class StoreFormatError(ValueError):
    """A stored blob is not per-user state of a format this code reads."""


# --- the per-user binary state -----------------------------------------------------------------


def _pack_text(values: Sequence[str], may_hold_nul: bool = True) -> tuple[bytes, bool]:
    """(encoded values, whether offsets were needed because a value holds a NUL)."""
    if not values:
        return b"", False
    if not may_hold_nul or not any("\x00" in v for v in values):
        return "\x00".join(values).encode(), False
    parts = [v.encode() for v in values]
    offsets = np.zeros(len(parts) + 1, dtype="<u4")
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return offsets.tobytes() + b"".join(parts), True


def _unpack_text(blob: bytes, start: int, size: int, count: int, offsets: bool) -> list[str]:
    if count == 0:
        return []
    if not offsets:
        return blob[start:start + size].decode().split("\x00")
    bounds = np.frombuffer(blob, "<u4", count + 1, start).tolist()
    body = start + 4 * (count + 1)
    return [blob[body + a:body + b].decode() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _blob(n_events: int, hashes: bytes, records: bytes | memoryview, values: Sequence[str], ids: Sequence[str],
          may_hold_nul: bool) -> bytes:
    text, text_offsets = _pack_text(values, may_hold_nul)
    id_text, id_offsets = _pack_text(ids)
    flags = (TEXT_OFFSETS if text_offsets else 0) | (IDS_OFFSETS if id_offsets else 0)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, flags, n_events, len(values), len(text), len(ids), len(id_text))
    return b"".join((header, hashes, records, text, id_text))


class _Tables(NamedTuple):
    """Each user's distinct values, in order of first appearance."""

    local: np.ndarray  # per value: its index in its user's table; NULL_INDEX for None
    bounds: np.ndarray  # user u's entries are [bounds[u], bounds[u + 1])
    entries: np.ndarray  # per entry: its code in `uniques`
    uniques: np.ndarray  # object

    def values(self) -> list[str]:
        """Every user's entries, concatenated (slice with `bounds`)."""
        return self.uniques[self.entries].tolist()


def _tables(owner: np.ndarray, values: np.ndarray, n_users: int) -> tuple[_Tables, np.ndarray]:
    """The per-user tables of `values` (grouped by `owner`, a user code), and each value's global code.
    Two hash factorizations, no sort: the (user, value) pairs appear grouped by user."""
    code, uniques = pd.factorize(values, sort=False)
    present = code >= 0
    own = owner[present]
    pair_code, pairs = pd.factorize((own << 32) | code[present], sort=False)
    bounds = np.searchsorted(pairs >> 32, np.arange(n_users + 1))
    local = np.full(len(values), NULL_INDEX, dtype=np.int64)
    local[present] = pair_code - bounds[own]
    return _Tables(local, bounds, pairs & 0xFFFFFFFF, np.asarray(uniques, dtype=object)), code


def encode_users(events: EventColumns, event_ids: Sequence[str | None] | None = None,
                 known_ids: Mapping[str, Iterable[str]] | None = None) -> tuple[list[str], list[bytes]]:
    """Per-user state of every user in `events`: (user ids in order of first appearance, blobs).

    A user's events keep their order. `event_ids` (aligned with the events, None for none) and
    `known_ids` (per user) are the event ids the blob remembers as seen."""
    codes, users = pd.factorize(events.user_id, sort=False)
    if len(codes) and (np.diff(codes) < 0).any():  # group each user's events, keeping their order
        order = np.argsort(codes, kind="stable")
        events, codes = events.take(order), codes[order]
        event_ids = None if event_ids is None else np.asarray(event_ids, dtype=object)[order]
    n, n_users = len(codes), len(users)
    codes = codes.astype(np.int64)
    bounds = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=n_users), out=bounds[1:])

    # A user's table: its distinct behaviours (index < 256), then its distinct item and category ids.
    behaviors, _ = _tables(codes, events.behavior, n_users)
    if n and behaviors.local.max() > 255:
        raise ValueError("a user has more than 256 distinct behaviours")
    ids_interleaved = np.empty(2 * n, dtype=object)
    ids_interleaved[0::2], ids_interleaved[1::2] = events.item_id, events.category_id
    ids, code = _tables(np.repeat(codes, 2), ids_interleaved, n_users)
    hash_of = np.zeros(len(ids.uniques), dtype=np.uint64)
    interleaved_hash = np.empty(2 * n, dtype=np.uint64)
    interleaved_hash[0::2], interleaved_hash[1::2] = events.item_hash, events.category_hash
    hash_of[code[code >= 0]] = interleaved_hash[code >= 0]
    entry_hash = hash_of[ids.entries].astype("<u8")
    n_behaviors = np.diff(behaviors.bounds)
    shifted = np.where(ids.local == NULL_INDEX, NULL_INDEX, ids.local + np.repeat(n_behaviors[codes], 2))
    behavior_values, id_values = behaviors.values(), ids.values()
    may_hold_nul = "\x00" in "".join(behaviors.uniques.tolist()) or "\x00" in "".join(ids.uniques.tolist())

    records = np.empty(n, dtype=RECORD)
    records["t"], records["amount"], records["behavior"] = events.t, events.amount, behaviors.local
    records["item"], records["category"] = shifted[0::2], shifted[1::2]
    record_bytes = memoryview(records.tobytes())
    seen = _ids_per_user(codes, n_users, event_ids, users, known_ids)
    size = RECORD.itemsize
    blobs = []
    for u in range(n_users):
        a, b = bounds[u], bounds[u + 1]
        ba, bb, va, vb = behaviors.bounds[u], behaviors.bounds[u + 1], ids.bounds[u], ids.bounds[u + 1]
        blobs.append(_blob(int(b - a), bytes(8 * int(bb - ba)) + entry_hash[va:vb].tobytes(),
                           record_bytes[a * size:b * size], behavior_values[ba:bb] + id_values[va:vb], seen[u],
                           may_hold_nul))
    return users.tolist(), blobs


def _ids_per_user(codes: np.ndarray, n_users: int, event_ids: Sequence[str | None] | None, users: np.ndarray,
                  known_ids: Mapping[str, Iterable[str]] | None) -> list[list[str]]:
    seen: list[list[str]] = [[] for _ in range(n_users)]
    if event_ids is not None:
        ids = np.asarray(event_ids, dtype=object)
        has = np.flatnonzero(~pd.isna(ids))
        for u, event_id in zip(codes[has].tolist(), ids[has].tolist(), strict=True):
            seen[u].append(event_id)
    if known_ids:
        for u, user in enumerate(users.tolist()):
            seen[u].extend(known_ids.get(user, ()))
    return [sorted(set(s)) if s else s for s in seen]


class _Parsed(NamedTuple):
    """Where the sections of one blob lie."""

    n_events: int
    n_values: int
    hashes_at: int
    records_at: int
    text_at: int
    text_bytes: int
    flags: int
    n_ids: int
    ids_bytes: int

    def values(self, blob: bytes) -> list[str]:
        return _unpack_text(blob, self.text_at, self.text_bytes, self.n_values, bool(self.flags & TEXT_OFFSETS))

    def ids(self, blob: bytes) -> list[str]:
        return _unpack_text(blob, self.text_at + self.text_bytes, self.ids_bytes, self.n_ids,
                            bool(self.flags & IDS_OFFSETS))


def _parse(blob: bytes) -> _Parsed:
    if len(blob) < HEADER.size:
        raise StoreFormatError(f"per-user state of {len(blob)} bytes is shorter than its header")
    magic, version, flags, n, n_values, text_bytes, n_ids, ids_bytes = HEADER.unpack_from(blob)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise StoreFormatError(f"per-user state of format {magic!r} v{version}; this code reads {MAGIC!r} v{FORMAT_VERSION}")
    records_at = HEADER.size + 8 * n_values
    text_at = records_at + RECORD.itemsize * n
    if len(blob) < text_at + text_bytes + ids_bytes:
        raise StoreFormatError(f"per-user state of {len(blob)} bytes is shorter than its header says")
    return _Parsed(n, n_values, HEADER.size, records_at, text_at, text_bytes, flags, n_ids, ids_bytes)


def decode_users(user_ids: Sequence[str], blobs: Sequence[bytes]) -> EventColumns:
    """The events of every user (blobs aligned with user_ids), concatenated in that order."""
    parsed = [_parse(b) for b in blobs]
    counts = [p.n_events for p in parsed]
    if len(parsed) == 1:  # the common case: views into the one blob
        p, blob = parsed[0], blobs[0]
        hashes = np.frombuffer(blob, "<u8", p.n_values, p.hashes_at)
        records = np.frombuffer(blob, RECORD, p.n_events, p.records_at)
        values, base = p.values(blob), 0
    else:  # the sections of every blob joined (bytes), then read once
        pairs = list(zip(parsed, blobs, strict=True))
        hashes = np.frombuffer(b"".join([b[p.hashes_at:p.records_at] for p, b in pairs]), "<u8")
        records = np.frombuffer(b"".join([b[p.records_at:p.text_at] for p, b in pairs]), RECORD)
        if any(p.flags & TEXT_OFFSETS for p in parsed):
            values = list(chain.from_iterable(p.values(b) for p, b in pairs))
        else:  # every user's values in one decode and split
            texts = [b[p.text_at:p.text_at + p.text_bytes] for p, b in pairs if p.n_values]
            values = b"\x00".join(texts).decode().split("\x00") if texts else []
        sizes = np.array([p.n_values for p in parsed], dtype=np.int64)
        base = np.repeat(np.cumsum(sizes) - sizes, counts)
    null = len(values)  # the extra last slot: None, hash 0
    table = np.empty(null + 1, dtype=object)
    table[:null] = values
    table_hash = np.zeros(null + 1, dtype=np.uint64)
    table_hash[:null] = hashes

    def lookup(index: np.ndarray) -> np.ndarray:  # the null index (0xFFFFFFFF) lands on the last slot
        return np.minimum(index.astype(np.int64) + base, null)

    item, category = lookup(records["item"]), lookup(records["category"])
    if len(parsed) == 1:
        user_column = np.full(counts[0], user_ids[0], dtype=object)
    else:
        users = np.empty(len(user_ids), dtype=object)
        users[:] = list(user_ids)
        user_column = np.repeat(users, counts)
    return EventColumns(
        user_id=user_column,
        t=records["t"].astype(np.float64),
        behavior=table[records["behavior"] + base],
        item_id=table[item],
        category_id=table[category],
        amount=records["amount"].astype(np.float64),
        item_hash=table_hash[item],
        category_hash=table_hash[category],
    )


def decode_ids(blob: bytes) -> list[str]:
    """The event ids a user's state remembers as seen."""
    return _parse(blob).ids(blob)


# --- the store -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreInfo:
    url: str  # without a password
    backend: str
    generation: int | None  # None: never materialized
    users: int
    events: int
    bytes: int  # per-user state, summed (the same measure for every backend)
    backend_bytes: int  # SQLite: file + WAL; Redis: the server's used_memory
    materialized_at: str | None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Merge:
    """What an append writes: the new blobs and the change in the generation's counts."""

    blobs: dict[str, bytes]
    events: int = 0
    users: int = 0
    bytes: int = 0


class Materialization:
    """A generation being written; `write_users` takes whole users (every event of each user in one
    call); nothing is visible to readers until the switch."""

    def __init__(self, write: Callable[[list[str], list[bytes]], None]) -> None:
        self._write = write
        self.users = self.events = self.bytes = 0

    def write_users(self, events: EventColumns, event_ids: Sequence[str | None] | None = None) -> int:
        users, blobs = encode_users(events, event_ids)
        if users:
            self._write(users, blobs)
        self.users += len(users)
        self.events += len(events)
        self.bytes += sum(map(len, blobs))
        return len(users)


class OnlineStore(ABC):
    """Per-user events by user id. Thread-safe; `get` is one round trip for any number of ids."""

    backend = ""

    def __init__(self, url: str) -> None:
        self.url = redact_url(url)

    def get(self, user_ids: Sequence[str]) -> tuple[EventColumns, list[str]]:
        """(the stored events of the known users, in the order asked; the unknown ids)."""
        wanted = list(dict.fromkeys(user_ids))
        blobs = self._read(wanted) if wanted else []
        known = [(u, b) for u, b in zip(wanted, blobs, strict=True) if b is not None]
        unknown = [u for u, b in zip(wanted, blobs, strict=True) if b is None]
        return decode_users([u for u, _ in known], [b for _, b in known]), unknown

    def append(self, events: EventColumns, event_ids: Sequence[str | None]) -> int:
        """Merge new events into their users' state (a new user is created); an event whose id the
        user already has is skipped, so a re-sent event counts once. Returns how many were new."""
        given = list(event_ids)
        if len(given) != len(events):
            raise ValueError(f"{len(given)} event ids for {len(events)} events")
        if not given:
            return 0
        ids = np.empty(len(given), dtype=object)
        ids[:] = given
        has = ~pd.isna(ids)
        ids[~has] = None
        # Within the batch, the first of a repeated (user, event id) counts.
        repeated = np.zeros(len(ids), dtype=bool)
        repeated[has] = pd.DataFrame({"u": events.user_id[has], "i": ids[has]}).duplicated().to_numpy()
        if repeated.any():
            events, ids = events.take(~repeated), ids[~repeated]
        users = list(dict.fromkeys(events.user_id.tolist()))
        return self._update(users, lambda stored: _merge(events, ids, stored))

    @contextmanager
    def materialize(self) -> Iterator[Materialization]:
        """A new generation: written inside the block, switched to when it ends without error,
        dropped when it raises."""
        generation = self._begin()
        job = Materialization(lambda users, blobs: self._write(generation, users, blobs))
        try:
            yield job
        except BaseException:
            self._abort(generation)
            raise
        self._commit(generation, job)

    def replace_all(self, parts: Iterable[EventColumns | tuple[EventColumns, Sequence[str | None] | None]]) -> StoreInfo:
        """Replace every user's state with `parts` (each holds whole users), atomically."""
        with self.materialize() as job:
            for part in parts:
                events, ids = part if isinstance(part, tuple) else (part, None)
                job.write_users(events, ids)
        return self.info()

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _read(self, user_ids: list[str]) -> list[bytes | None]: ...

    @abstractmethod
    def _update(self, user_ids: list[str], merge: Callable[[dict[str, bytes]], _Merge]) -> int: ...

    @abstractmethod
    def _begin(self) -> int: ...

    @abstractmethod
    def _write(self, generation: int, users: list[str], blobs: list[bytes]) -> None: ...

    @abstractmethod
    def _commit(self, generation: int, job: Materialization) -> None: ...

    @abstractmethod
    def _abort(self, generation: int) -> None: ...

    @abstractmethod
    def info(self) -> StoreInfo: ...

    @abstractmethod
    def close(self) -> None: ...


def _merge(events: EventColumns, ids: np.ndarray, stored: dict[str, bytes]) -> _Merge:
    """The append of `events` onto the users' `stored` state (only users with something new)."""
    seen = {user: set(decode_ids(blob)) for user, blob in stored.items()}
    new = np.fromiter((i is None or i not in seen.get(u, ()) for u, i in zip(events.user_id, ids, strict=True)),
                      dtype=bool, count=len(ids))
    if not new.any():
        return _Merge({})
    events, ids = events.take(new), ids[new]
    touched = list(dict.fromkeys(events.user_id.tolist()))
    before = [u for u in touched if u in stored]
    old = decode_users(before, [stored[u] for u in before])
    merged = concat([old, events])
    all_ids = np.concatenate([np.full(len(old), None, dtype=object), ids])
    users, blobs = encode_users(merged, all_ids, {u: seen[u] for u in before})
    return _Merge(dict(zip(users, blobs, strict=True)), events=len(events), users=len(touched) - len(before),
                  bytes=sum(map(len, blobs)) - sum(len(stored[u]) for u in before))


# --- SQLite ----------------------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class SqliteStore(OnlineStore):
    """One SQLite file (WAL): table `users_g<N>` (user_id, state) per generation, `generations`
    (counts, state), `meta` (the current generation)."""

    backend = "sqlite"

    def __init__(self, url: str, path: Path) -> None:
        super().__init__(url)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        with _sqlite_errors(self.url):
            self._con = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self._con.execute("PRAGMA auto_vacuum = INCREMENTAL")  # effective on a new file only
            self._con.execute("PRAGMA journal_mode = WAL")
            self._con.execute("PRAGMA synchronous = NORMAL")
            self._con.execute("PRAGMA journal_size_limit = 67108864")  # the WAL shrinks back after a checkpoint
            self._con.execute("PRAGMA mmap_size = 268435456")
            with self._transaction():
                self._con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._con.execute(
                    "CREATE TABLE IF NOT EXISTS generations (generation INTEGER PRIMARY KEY, state TEXT NOT NULL, "
                    "users INTEGER NOT NULL DEFAULT 0, events INTEGER NOT NULL DEFAULT 0, "
                    "bytes INTEGER NOT NULL DEFAULT 0, materialized_at TEXT, format_version INTEGER NOT NULL)")
                self._con.execute("CREATE VIEW IF NOT EXISTS current_users AS "
                                  "SELECT '' AS user_id, x'' AS state WHERE 0")  # nothing until the first switch

    @contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        with self._lock, _sqlite_errors(self.url):
            self._con.execute(f"BEGIN {mode}")
            try:
                yield self._con
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    def _current(self, con: sqlite3.Connection) -> int | None:
        row = con.execute("SELECT value FROM meta WHERE key = 'current'").fetchone()
        return None if row is None else int(row[0])

    def _read(self, user_ids: list[str]) -> list[bytes | None]:
        # One statement on the view of the current generation (replaced in the switch's transaction).
        with self._lock, _sqlite_errors(self.url):
            found = self._select(self._con, "current_users", user_ids)
        return [found.get(u) for u in user_ids]

    @staticmethod
    def _select(con: sqlite3.Connection, table: str, user_ids: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for chunk in _chunks(user_ids, 30_000):
            found.update(con.execute(
                f"SELECT user_id, state FROM {table} WHERE user_id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def _update(self, user_ids: list[str], merge: Callable[[dict[str, bytes]], _Merge]) -> int:
        with self._transaction() as con:
            generation = self._current(con)
            if generation is None:  # never materialized: start from an empty generation
                generation = self._create(con)
                self._switch(con, generation, users=0, events=0, size=0, materialized=False)
            change = merge(self._select(con, f"users_g{generation}", user_ids))
            if change.blobs:
                con.executemany(f"INSERT OR REPLACE INTO users_g{generation} (user_id, state) VALUES (?, ?)",
                                change.blobs.items())
                con.execute("UPDATE generations SET users = users + ?, events = events + ?, bytes = bytes + ? "
                            "WHERE generation = ?", (change.users, change.events, change.bytes, generation))
        return change.events

    def _create(self, con: sqlite3.Connection) -> int:
        generation = con.execute("SELECT coalesce(max(generation), 0) + 1 FROM generations").fetchone()[0]
        con.execute(f"CREATE TABLE users_g{generation} (user_id TEXT PRIMARY KEY, state BLOB NOT NULL)")
        con.execute("INSERT INTO generations (generation, state, format_version) VALUES (?, 'building', ?)",
                    (generation, FORMAT_VERSION))
        return generation

    def _switch(self, con: sqlite3.Connection, generation: int, *, users: int, events: int, size: int,
                materialized: bool = True) -> None:
        con.execute("UPDATE generations SET state = 'current', users = ?, events = ?, bytes = ?, materialized_at = ? "
                    "WHERE generation = ?", (users, events, size, _now() if materialized else None, generation))
        con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('current', ?)", (str(generation),))
        con.execute("DROP VIEW current_users")
        con.execute(f"CREATE VIEW current_users AS SELECT user_id, state FROM users_g{generation}")

    def _begin(self) -> int:
        with self._transaction() as con:
            return self._create(con)

    def _write(self, generation: int, users: list[str], blobs: list[bytes]) -> None:
        try:
            with self._transaction() as con:
                con.executemany(f"INSERT INTO users_g{generation} (user_id, state) VALUES (?, ?)", zip(users, blobs))
        except sqlite3.IntegrityError as error:
            raise ValueError(f"a user was written twice in one materialization ({error})") from None

    def _commit(self, generation: int, job: Materialization) -> None:
        with self._transaction() as con:
            self._switch(con, generation, users=job.users, events=job.events, size=job.bytes)
        self._drop(keep=generation)

    def _abort(self, generation: int) -> None:
        self._drop(keep=self._current_generation(), only=generation)

    def _current_generation(self) -> int | None:
        with self._transaction("DEFERRED") as con:
            return self._current(con)

    def _drop(self, keep: int | None, only: int | None = None) -> None:
        """Drop every generation but `keep` (or just `only`), then give the pages back to the file."""
        with self._transaction() as con:
            rows = con.execute("SELECT generation FROM generations WHERE generation IS NOT ?", (keep,)).fetchall()
            for (generation,) in rows:
                if only is None or generation == only:
                    con.execute(f"DROP TABLE IF EXISTS users_g{generation}")
                    con.execute("DELETE FROM generations WHERE generation = ?", (generation,))
        with self._lock, _sqlite_errors(self.url):
            self._con.execute("PRAGMA incremental_vacuum").fetchall()  # one row per page freed: step them all
            self._con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def info(self) -> StoreInfo:
        with self._transaction("DEFERRED") as con:
            generation = self._current(con)
            row = con.execute("SELECT users, events, bytes, materialized_at, format_version FROM generations "
                              "WHERE generation = ?", (generation,)).fetchone() or (0, 0, 0, None, FORMAT_VERSION)
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return StoreInfo(self.url, self.backend, generation, row[0], row[1], row[2], size, row[3], row[4])

    def close(self) -> None:
        with self._lock:
            self._con.close()


@contextmanager
def _sqlite_errors(url: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.OperationalError as error:  # locked, busy, disk I/O: a retry may help
        raise TransientError(f"online store {url}: {error}") from error
    except sqlite3.DatabaseError as error:
        if isinstance(error, sqlite3.IntegrityError):
            raise
        raise ConfigError(f"online store {url}: {error} (not an online store file?)") from error


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- Redis -----------------------------------------------------------------------------------------

# One round trip: the current generation and the users' state, read in one atomic script.
_GET_SCRIPT = """
local generation = redis.call('GET', KEYS[1])
if not generation then return {} end
local prefix = ARGV[1] .. generation .. ':u:'
local keys = {}
for i = 2, #ARGV do keys[i - 1] = prefix .. ARGV[i] end
return redis.call('MGET', unpack(keys))
"""
_SCRIPT_IDS = 4000  # Lua's unpack() limit is about 8000 values
_PIPELINE_KEYS = 1000


class RedisStore(OnlineStore):
    """Keys `<ns>:current` (the generation), `<ns>:g<N>:u:<user_id>` (state), `<ns>:g<N>:meta`
    (counts), `<ns>:generations` (every generation not yet dropped)."""

    backend = "redis"

    def __init__(self, url: str, namespace: str = "uservalue") -> None:
        super().__init__(url)
        import redis

        self._redis = redis
        self.ns = namespace
        with self._errors():
            self._client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                                health_check_interval=30)
            self._client.ping()
        self._get = self._client.register_script(_GET_SCRIPT)
        self._current_key = f"{namespace}:current"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        errors = self._redis.exceptions
        try:
            yield
        except errors.AuthenticationError as error:
            raise ConfigError(f"online store {self.url}: {error}") from error
        except (errors.ConnectionError, errors.TimeoutError) as error:
            raise TransientError(f"online store {self.url} unreachable: {error}") from error
        except errors.ResponseError as error:  # out of memory, read-only replica, loading...
            raise TransientError(f"online store {self.url}: {error}") from error

    def _prefix(self, generation: int | bytes) -> str:
        return f"{self.ns}:g{int(generation)}"

    def _user_keys(self, generation: int | bytes, users: Sequence[str]) -> list[bytes]:
        prefix = f"{self._prefix(generation)}:u:".encode()
        return [prefix + u.encode() for u in users]

    def _read(self, user_ids: list[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._errors():
            for chunk in _chunks(user_ids, _SCRIPT_IDS):
                found = self._get(keys=[self._current_key], args=[f"{self.ns}:g", *chunk])
                out.extend(found or [None] * len(chunk))
        return out

    def _update(self, user_ids: list[str], merge: Callable[[dict[str, bytes]], _Merge]) -> int:
        with self._errors():
            if self._client.get(self._current_key) is None:  # never materialized: an empty generation
                generation = self._begin()
                self._client.hset(f"{self._prefix(generation)}:meta", mapping={
                    "users": 0, "events": 0, "bytes": 0, "format_version": FORMAT_VERSION})
                if not self._client.set(self._current_key, generation, nx=True):  # another writer was first
                    self._drop(generation)
            with self._client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self._current_key)
                        generation = int(pipe.get(self._current_key))
                        keys = self._user_keys(generation, user_ids)
                        pipe.watch(*keys)
                        stored = {u: b for u, b in zip(user_ids, pipe.mget(keys), strict=True) if b is not None}
                        change = merge(stored)
                        pipe.multi()
                        if change.blobs:
                            pipe.mset(dict(zip(self._user_keys(generation, list(change.blobs)), change.blobs.values(),
                                               strict=True)))
                            meta = f"{self._prefix(generation)}:meta"
                            for field, delta in (("users", change.users), ("events", change.events),
                                                 ("bytes", change.bytes)):
                                pipe.hincrby(meta, field, delta)
                        pipe.execute()
                        return change.events
                    except self._redis.WatchError:  # the users or the generation changed meanwhile: again
                        continue

    def _begin(self) -> int:
        with self._errors():
            generation = int(self._client.incr(f"{self.ns}:next_generation"))
            self._client.sadd(f"{self.ns}:generations", generation)
        return generation

    def _write(self, generation: int, users: list[str], blobs: list[bytes]) -> None:
        with self._errors():
            for start in range(0, len(users), _PIPELINE_KEYS):
                pipe = self._client.pipeline(transaction=False)
                keys = self._user_keys(generation, users[start:start + _PIPELINE_KEYS])
                for key, blob in zip(keys, blobs[start:start + _PIPELINE_KEYS], strict=True):
                    pipe.set(key, blob, nx=True)
                if not all(pipe.execute()):
                    raise ValueError("a user was written twice in one materialization")

    def _commit(self, generation: int, job: Materialization) -> None:
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(f"{self._prefix(generation)}:meta", mapping={
                "users": job.users, "events": job.events, "bytes": job.bytes, "materialized_at": _now(),
                "format_version": FORMAT_VERSION})
            pipe.set(self._current_key, generation)
            pipe.execute()
            for old in self._client.smembers(f"{self.ns}:generations"):
                if int(old) != generation:
                    self._drop(int(old))

    def _abort(self, generation: int) -> None:
        with self._errors():
            self._drop(generation)

    def _drop(self, generation: int) -> None:
        batch: list[bytes] = []
        for key in self._client.scan_iter(match=f"{self._prefix(generation)}:*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                self._client.unlink(*batch)
                batch = []
        if batch:
            self._client.unlink(*batch)
        self._client.srem(f"{self.ns}:generations", generation)

    def info(self) -> StoreInfo:
        with self._errors():
            generation = self._client.get(self._current_key)
            meta = self._client.hgetall(f"{self._prefix(generation)}:meta") if generation is not None else {}
            used = int(self._client.info("memory").get("used_memory", 0))
        field = {k.decode(): v.decode() for k, v in meta.items()}
        return StoreInfo(self.url, self.backend, None if generation is None else int(generation),
                         int(field.get("users", 0)), int(field.get("events", 0)), int(field.get("bytes", 0)), used,
                         field.get("materialized_at"), int(field.get("format_version", FORMAT_VERSION)))

    def close(self) -> None:
        self._client.close()


# --- opening ---------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL without its password (for reports and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def store_url(params_url: str | None = None, override: str | None = None) -> str:
    """The store to use: an explicit override, else USERVALUE_STORE_URL, else params serve.store.url."""
    return override or os.environ.get(ENV_URL) or params_url or DEFAULT_URL


def open_store(url: str, *, root: str | Path | None = None, namespace: str = "uservalue") -> OnlineStore:
    """`sqlite:///<path>` (relative to `root`, default the working directory; `sqlite:////abs`) or
    `redis://` / `rediss://` / `unix://` (redis-py URLs). An unreachable Redis is a TransientError."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        raw = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not raw or raw == ":memory:":
            raise ConfigError(f"online store {url!r}: expected sqlite:///<file path>")
        path = Path(raw)
        return SqliteStore(url, path if path.is_absolute() else Path(root or ".").resolve() / path)
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, namespace)
    raise ConfigError(f"online store {redact_url(url)!r}: expected sqlite:///<path> or redis://host:port/db")

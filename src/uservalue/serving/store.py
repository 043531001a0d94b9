"""The online store: each user's canonical events by user id, in SQLite (default, store_sqlite) or Redis
(store_redis), written in generations switched atomically (docs/online.md)."""

from __future__ import annotations

import datetime as dt
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd

from uservalue.errors import ConfigError
from uservalue.features.online import EventColumns, concat
from uservalue.serving.store_codec import FORMAT_VERSION, decode_ids, decode_users, encode_users

ENV_URL = "USERVALUE_STORE_URL"
DEFAULT_URL = "sqlite:///data/online/store.sqlite"


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
class Merge:
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
    def _update(self, user_ids: list[str], merge: Callable[[dict[str, bytes]], Merge]) -> int: ...

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


def _merge(events: EventColumns, ids: np.ndarray, stored: dict[str, bytes]) -> Merge:
    """The append of `events` onto the users' `stored` state (only users with something new)."""
    seen = {user: set(decode_ids(blob)) for user, blob in stored.items()}
    new = np.fromiter((i is None or i not in seen.get(u, ()) for u, i in zip(events.user_id, ids, strict=True)),
                      dtype=bool, count=len(ids))
    if not new.any():
        return Merge({})
    events, ids = events.take(new), ids[new]
    touched = list(dict.fromkeys(events.user_id.tolist()))
    before = [u for u in touched if u in stored]
    old = decode_users(before, [stored[u] for u in before])
    merged = concat([old, events])
    all_ids = np.concatenate([np.full(len(old), None, dtype=object), ids])
    users, blobs = encode_users(merged, all_ids, {u: seen[u] for u in before})
    return Merge(dict(zip(users, blobs, strict=True)), events=len(events), users=len(touched) - len(before),
                  bytes=sum(map(len, blobs)) - sum(len(stored[u]) for u in before))


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


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
    from uservalue.serving.store_redis import RedisStore
    from uservalue.serving.store_sqlite import SqliteStore

    if scheme == "sqlite":
        raw = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not raw or raw == ":memory:":
            raise ConfigError(f"online store {url!r}: expected sqlite:///<file path>")
        path = Path(raw)
        return SqliteStore(url, path if path.is_absolute() else Path(root or ".").resolve() / path)
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, namespace)
    raise ConfigError(f"online store {redact_url(url)!r}: expected sqlite:///<path> or redis://host:port/db")

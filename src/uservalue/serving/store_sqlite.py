"""The embedded online store: one SQLite file, a table per generation behind the view `current_users`."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from uservalue.errors import ConfigError, TransientError
from uservalue.serving.store import Materialization, Merge, OnlineStore, StoreInfo, chunks, now_iso
from uservalue.serving.store_codec import FORMAT_VERSION


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
        for chunk in chunks(user_ids, 30_000):
            found.update(con.execute(
                f"SELECT user_id, state FROM {table} WHERE user_id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def _update(self, user_ids: list[str], merge: Callable[[dict[str, bytes]], Merge]) -> int:
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
                    "WHERE generation = ?", (users, events, size, now_iso() if materialized else None, generation))
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



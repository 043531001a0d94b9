"""The production online store: Redis, a key prefix per generation behind `<namespace>:current`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from uservalue.errors import ConfigError, TransientError
from uservalue.serving.store import Materialization, Merge, OnlineStore, StoreInfo, chunks, now_iso
from uservalue.serving.store_codec import FORMAT_VERSION

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
            for chunk in chunks(user_ids, _SCRIPT_IDS):
                found = self._get(keys=[self._current_key], args=[f"{self.ns}:g", *chunk])
                out.extend(found or [None] * len(chunk))
        return out

    def _update(self, user_ids: list[str], merge: Callable[[dict[str, bytes]], Merge]) -> int:
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
                "users": job.users, "events": job.events, "bytes": job.bytes, "materialized_at": now_iso(),
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



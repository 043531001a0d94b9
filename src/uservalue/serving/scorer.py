"""Online scoring: raw recent events of one or many users -> p_buy, expected_value and the
behaviour influence, plus the prediction log the monitor reads.

The BentoML service (service.py) is a thin HTTP layer over this module. Batch scoring
(`uservalue score`) and the monitor call `score_events` too, so the service, the pipeline and
the monitor share one feature function (uservalue.features.sql.build_features) and one prediction
function (uservalue.lifecycle.tracking.predict_with_influence): no train/serve skew.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from uservalue.config import ServeParams, load_params
from uservalue.errors import UservalueError
from uservalue.models.base import ModelInfo
from uservalue.schema import EVENTS_SCHEMA

PREDICTION_LOG_COLUMNS = ("request_time", "request_id", "as_of", "model_name", "model_version", "user_id",
                          "p_buy", "expected_value", "horizon_days")
# Batched requests' users are featurized as "<request>\x1f<user id>", so that the same user id in
# two requests of one batch stays two users (each with its own events); the key is stripped again
# before the model sees the id.
KEY_SEPARATOR = "\x1f"
# Health probes must work without the key (orchestrators probe them anonymously).
OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})


def as_utc(value: dt.datetime) -> dt.datetime:
    """Times without an offset are UTC (the canonical event table's zone)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _id_to_str(value: Any) -> Any:
    # JSON clients send ids as numbers as often as strings; both name the same user or item.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Identifier = Annotated[str, BeforeValidator(_id_to_str), Field(min_length=1, max_length=256)]


class Event(BaseModel):
    """One behaviour event, as a client sends it (the canonical event table's columns)."""

    model_config = ConfigDict(extra="forbid")

    user_id: Identifier
    ts: dt.datetime = Field(description="ISO 8601 time; without an offset it is read as UTC")
    behavior: str = Field(min_length=1, description="one of the model's behaviours, e.g. view, fav, cart, buy")
    item_id: Annotated[str | None, BeforeValidator(_id_to_str)] = None
    category_id: Annotated[str | None, BeforeValidator(_id_to_str)] = None
    quantity: float = Field(1.0, ge=0, allow_inf_nan=False)
    amount: float = Field(0.0, ge=0, allow_inf_nan=False, description="money spent (purchases)")

    @field_validator("ts")
    @classmethod
    def _utc(cls, value: dt.datetime) -> dt.datetime:
        return as_utc(value)


class RequestError(UservalueError):
    """A client mistake: an HTTP 4xx whose body names the field (`loc`) and the problem."""

    def __init__(self, loc: Sequence[str | int], problem: str, status: int = 400) -> None:
        self.loc = list(loc)
        self.problem = problem
        self.status = status
        super().__init__(f"{'.'.join(map(str, self.loc))}: {problem}")

    def body(self) -> dict[str, Any]:
        # The same shape as BentoML's own validation errors, so clients parse one format.
        return {"error": str(self), "detail": [{"loc": self.loc, "msg": self.problem}]}


def validate_events(events: Sequence[Event], behaviors: Sequence[str], max_events: int, max_users: int) -> set[str]:
    """The request's users, or a RequestError naming what the model cannot score."""
    if not events:
        raise RequestError(["events"], "must hold at least one event")
    if len(events) > max_events:
        raise RequestError(["events"], f"{len(events)} events; at most {max_events} per request", status=413)
    known = set(behaviors)
    for index, event in enumerate(events):
        if event.behavior not in known:
            raise RequestError(["events", index, "behavior"],
                               f"unknown behaviour {event.behavior!r}; expected one of {list(behaviors)}")
    users = {event.user_id for event in events}
    if len(users) > max_users:
        raise RequestError(["events"], f"{len(users)} users; at most {max_users} per request", status=413)
    return users


def events_table(requests: Sequence[Sequence[Event]], keys: Sequence[str] | None = None) -> pa.Table:
    """The events of one or more requests as the canonical events table (the feature function's
    input); with `keys`, each user id is prefixed by its request's key (see KEY_SEPARATOR)."""
    columns = {name: [getattr(e, name) for events in requests for e in events] for name in EVENTS_SCHEMA.names}
    if keys is not None:
        columns["user_id"] = [f"{key}{KEY_SEPARATOR}{e.user_id}" for key, events in zip(keys, requests, strict=True)
                              for e in events]
    return pa.table(columns, schema=EVENTS_SCHEMA)


def score_features(model: Any, features: pd.DataFrame) -> pd.DataFrame:
    """Predictions with influence shares, plus the aggregate features (the monitor watches them)."""
    from uservalue.models.model_input import predict_with_influence

    predictions = predict_with_influence(model, features)
    aggregates = [c for c in model.spec.aggregate_columns() if c in features.columns]
    return pd.concat([predictions.reset_index(drop=True), features[aggregates].reset_index(drop=True)], axis=1)


def score_events(model: Any, events: str | Path | pa.Table | pd.DataFrame, as_of: dt.datetime,
                 con: Any = None) -> pd.DataFrame:
    """Score every user with an event before `as_of`: the batch, the service and the monitor use it."""
    from uservalue.features.sql import build_features

    features = build_features(events, as_of, model.spec, con=con).to_pandas()
    return score_features(model, features)


@dataclass(frozen=True)
class ScoreRequest:
    """One validated /predict call, waiting to be scored (alone or in a batch)."""

    events: Sequence[Event]
    users: frozenset[str]
    as_of: dt.datetime | None  # None: the time its batch is scored
    received: dt.datetime
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class ScoredBatch:
    """What one feature query and one forward pass gave a batch of requests."""

    requests: Sequence[ScoreRequest]
    as_of: list[dt.datetime]  # per request
    scored: pd.DataFrame  # one row per answered user: score_features' columns
    request: np.ndarray  # per row of `scored`: the position of its request in `requests`
    errors: dict[int, RequestError]  # per failed request position: its client error (no rows in `scored`)


class Scorer:
    """A loaded model and a DuckDB connection per thread: requests in, scored users out."""

    def __init__(self, model: Any, info: ModelInfo, max_events: int, max_users: int) -> None:
        from uservalue import duck

        self.model = model
        self.info = info
        self.max_events = max_events
        self.max_users = max_users
        # A batch is a few users: intra-op threads only add hand-off costs (measured on 2 cores: the
        # MLP's predict + attribution of one user 33 ms with torch's default threads, 13 ms with one).
        self._root = duck.connect(memory_limit="1GB", threads=1)
        if "torch" in sys.modules:  # a torch model is loaded; never import torch just for this
            sys.modules["torch"].set_num_threads(1)
        # One cursor (DuckDB connection) per thread that scores.
        self._local = threading.local()
        self._warm_up()

    def _connection(self) -> Any:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = self._root.cursor()
        return con

    def _warm_up(self) -> None:
        # The first query and forward pass pay for lazy initialisation (about a second):
        # pay it at start-up, not in a client's request.
        now = dt.datetime.now(dt.UTC)
        events = [Event(user_id="warm-up", ts=now - dt.timedelta(days=1), behavior=b) for b in self.model.spec.behaviors]
        self.score(events, now)

    def prepare(self, events: Sequence[Event], as_of: dt.datetime | None,
                received: dt.datetime | None = None) -> ScoreRequest:
        """Validate one request (a RequestError names what is wrong) before it joins a batch."""
        users = validate_events(events, self.model.spec.behaviors, self.max_events, self.max_users)
        return ScoreRequest(events=events, users=frozenset(users), as_of=None if as_of is None else as_utc(as_of),
                            received=received or dt.datetime.now(dt.UTC))

    def score_batch(self, requests: Sequence[ScoreRequest]) -> ScoredBatch:
        """Score several requests with one feature query per distinct as_of and one model call.

        Each request's users get exactly the rows they would get alone: features are computed per
        (request, user) and the model scores rows independently."""
        from uservalue.features.sql import build_features

        now = dt.datetime.now(dt.UTC)
        as_of = [r.as_of or now for r in requests]
        frames = []
        for cutoff in dict.fromkeys(as_of):  # distinct, in order
            members = [i for i, c in enumerate(as_of) if c == cutoff]
            table = events_table([requests[i].events for i in members], keys=[str(i) for i in members])
            frames.append(build_features(table, cutoff, self.model.spec, con=self._connection()).to_pandas())
        features = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        keys = features["user_id"].str.split(KEY_SEPARATOR, n=1, expand=True)
        position = keys[0].astype(np.int64).to_numpy() if len(features) else np.zeros(0, dtype=np.int64)
        features["user_id"] = keys[1] if len(features) else features["user_id"]
        errors: dict[int, RequestError] = {}
        answered = set(zip(position.tolist(), features["user_id"], strict=True))
        for i, request in enumerate(requests):
            missing = {u for u in request.users if (i, u) not in answered}
            if missing:
                first = next(k for k, e in enumerate(request.events) if e.user_id in missing)
                errors[i] = RequestError(
                    ["events", first, "ts"],
                    f"user {request.events[first].user_id!r} has no event before as_of {as_of[i].isoformat()}",
                    status=422)
        if errors:  # a failed request is answered by its error alone: drop its other users too
            keep = ~np.isin(position, list(errors))
            features, position = features[keep].reset_index(drop=True), position[keep]
        if len(features):
            scored = score_features(self.model, features)
        else:  # every request failed: nothing to score
            scored = pd.DataFrame(columns=self._answered_columns())
        return ScoredBatch(requests, as_of, scored, position, errors)

    def score(self, events: Sequence[Event], as_of: dt.datetime | None) -> tuple[dt.datetime, pd.DataFrame]:
        """One request, scored alone: (its as_of, one row per user); a RequestError if it fails."""
        batch = self.score_batch([self.prepare(events, as_of)])
        if batch.errors:
            raise batch.errors[0]
        return batch.as_of[0], batch.scored

    def _answered_columns(self) -> list[str]:
        return ["user_id", "p_buy", "expected_value", *(f"influence_{b}" for b in self.model.spec.behaviors)]

    def response_rows(self, scored: pd.DataFrame) -> list[dict[str, Any]]:
        behaviors = self.model.spec.behaviors
        # Only the answered columns: `scored` also carries every aggregate feature (for the log).
        rows = []
        for record in scored[self._answered_columns()].to_dict("records"):
            rows.append({
                "user_id": record["user_id"],
                "p_buy": float(record["p_buy"]),
                "expected_value": float(record["expected_value"]),
                "horizon_days": int(self.model.horizon_days),
                "model_version": self.info.version,
                "influence": {b: float(record[f"influence_{b}"]) for b in behaviors},
            })
        return rows

    def answers(self, batch: ScoredBatch) -> list[dict[str, Any] | RequestError]:
        """Each request's response body, or its client error."""
        rows = self.response_rows(batch.scored)
        per_request: dict[int, list[dict[str, Any]]] = {}
        for position, row in zip(batch.request.tolist(), rows, strict=True):
            per_request.setdefault(position, []).append(row)
        model = {"name": self.info.name, "version": self.info.version}
        return [batch.errors[i] if i in batch.errors else
                {"as_of": batch.as_of[i].isoformat(), "model": model, "predictions": per_request.get(i, [])}
                for i in range(len(batch.requests))]

    def log_frame(self, batch: ScoredBatch) -> pd.DataFrame:
        """The prediction log's rows for a batch: each answered user with its request's time and id."""
        requests = batch.requests
        frame = batch.scored.copy()
        frame.insert(0, "request_time", pd.to_datetime([requests[i].received for i in batch.request], utc=True))
        frame.insert(1, "request_id", [requests[i].request_id for i in batch.request])
        frame.insert(2, "as_of", pd.to_datetime([batch.as_of[i] for i in batch.request], utc=True))
        frame.insert(3, "model_name", self.info.name)
        frame.insert(4, "model_version", self.info.version)
        frame["horizon_days"] = int(self.model.horizon_days)
        return frame


class BatchingPredictor:
    """The service's request path: requests that arrive while a batch is being scored wait, and
    are scored together next, with one feature query and one forward pass.

    This amortises the fixed cost of a query (about 15 ms in DuckDB's planner, whatever the number
    of users) over every request that queued meanwhile. A lone request is scored at once. Under
    load, a batch waits up to `max_wait_ms` for as many requests as the previous batch held: the
    clients just answered need a moment to send their next request, and without the wait a steady
    load of N clients splits into a batch of 1 and a batch of N-1, paying the fixed cost twice.
    A batch holds at most `max_users` users and `max_events` events (the per-request limits);
    scoring runs on one thread beside the event loop, which keeps accepting requests.
    """

    def __init__(self, scorer: Scorer, log: PredictionLog, max_wait_ms: float = 5.0,
                 observe: Callable[[int, float], None] | None = None) -> None:
        self.scorer = scorer
        self.log = log
        self.max_wait = max_wait_ms / 1000
        self._observe = observe  # (requests in the batch, seconds to score it), e.g. Prometheus
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uservalue-scorer")
        self._queue: deque[tuple[ScoreRequest, asyncio.Future[Any]]] = deque()
        self._arrived: asyncio.Event | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._expected = 1  # requests the next batch waits for: the previous batch's size
        self.batches = 0
        self.largest_batch = 0

    async def predict(self, events: Sequence[Event], as_of: dt.datetime | None) -> dict[str, Any]:
        """The response body for one /predict call; raises RequestError for a client mistake."""
        request = self.scorer.prepare(events, as_of)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._queue.append((request, answer))
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self._arrived.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await answer

    async def _gather(self) -> None:
        """Wait (at most max_wait) until as many requests queue as the previous batch held."""
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(self._queue) < self._expected:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _next_batch(self) -> list[tuple[ScoreRequest, asyncio.Future[Any]]]:
        batch = [self._queue.popleft()]
        users, events = len(batch[0][0].users), len(batch[0][0].events)
        while self._queue:
            request = self._queue[0][0]
            users += len(request.users)
            events += len(request.events)
            if users > self.scorer.max_users or events > self.scorer.max_events:
                break
            batch.append(self._queue.popleft())
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if self.max_wait > 0 and len(self._queue) < self._expected:
                await self._gather()
            batch = self._next_batch()
            self._expected = len(batch)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self._executor, self._answer, [r for r, _ in batch])
            except Exception as error:  # noqa: BLE001 - handed to every caller of the batch (their 500)
                answers = [error] * len(batch)
            if self._observe is not None:
                self._observe(len(batch), time.perf_counter() - started)
            for (_, future), answer in zip(batch, answers, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)

    def _answer(self, requests: list[ScoreRequest]) -> list[Any]:
        try:
            batch = self.scorer.score_batch(requests)
        except Exception:
            if len(requests) == 1:
                raise
            # Something failed that validation did not catch: score each request alone, so one
            # request's problem fails that request only.
            return [self._answer_one(r) for r in requests]
        if len(batch.scored):
            self.log.append(self.scorer.log_frame(batch))
        return self.scorer.answers(batch)

    def _answer_one(self, request: ScoreRequest) -> Any:
        try:
            return self._answer([request])[0]
        except Exception as error:  # noqa: BLE001 - handed to this request's caller (its 500)
            return error

    def close(self) -> None:
        """Finish the batch in flight, then flush the prediction log."""
        self._executor.shutdown(wait=True)
        self.log.close()


class PredictionLog:
    """Append-only Parquet log of served predictions: `<dir>/date=YYYY-MM-DD/part-*.parquet`.

    Requests only append to a buffer (microseconds); a background thread writes it out when it
    holds `flush_records` rows or is `flush_seconds` old, and `close()` writes what is left, so a
    stopping service loses nothing. Files rotate by day (the folder) and by size (one file per
    flush, at most `flush_records` rows each). Each file is written under a temporary name and
    renamed, so a reader never sees half a file.
    """

    def __init__(self, directory: str | Path, flush_records: int = 1000, flush_seconds: float = 5.0) -> None:
        self.directory = Path(directory)
        self.flush_records = flush_records
        self.flush_seconds = flush_seconds
        self._frames: list[pd.DataFrame] = []
        self._rows = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._written = 0
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    @property
    def written(self) -> int:
        return self._written

    def append(self, frame: pd.DataFrame) -> None:
        if self._closed.is_set():
            raise RuntimeError("the prediction log is closed")
        with self._lock:
            self._frames.append(frame)
            self._rows += len(frame)
            full = self._rows >= self.flush_records
        if full:
            self._wake.set()

    def flush(self) -> int:
        with self._lock:
            frames, self._frames, self._rows = self._frames, [], 0
        if not frames:
            return 0
        data = pd.concat(frames, ignore_index=True)
        days = data["request_time"].dt.strftime("%Y-%m-%d")
        for day, part in data.groupby(days, sort=True):
            for start in range(0, len(part), self.flush_records):
                self._write(day, part.iloc[start:start + self.flush_records])
        self._written += len(data)
        return len(data)

    def _write(self, day: str, part: pd.DataFrame) -> None:
        folder = self.directory / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%H%M%S%f")
        name = f"part-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = folder / f".{name}.tmp"
        part.to_parquet(tmp, index=False)
        os.replace(tmp, folder / name)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()


def read_prediction_log(directory: str | Path, since: dt.datetime | None = None,
                        until: dt.datetime | None = None) -> pd.DataFrame:
    """Every logged prediction with since <= request_time < until (all when not given)."""
    directory = Path(directory)
    files = sorted(directory.glob("date=*/part-*.parquet"))
    if since is not None:
        first_day = since.astimezone(dt.UTC).date().isoformat()
        files = [f for f in files if f.parent.name.removeprefix("date=") >= first_day]
    if not files:
        return pd.DataFrame(columns=list(PREDICTION_LOG_COLUMNS))
    data = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if since is not None:
        data = data[data["request_time"] >= pd.Timestamp(since)]
    if until is not None:
        data = data[data["request_time"] < pd.Timestamp(until)]
    return data.sort_values("request_time", kind="stable").reset_index(drop=True)


@functools.cache
def batch_metrics() -> Callable[[int, float], None]:
    """Prometheus histograms of the batches (on BentoML's /metrics): how many requests each
    batch held and how long it took to score, the two figures for tuning serve.batch_wait_ms.
    Created once per process (Prometheus refuses a second registration)."""
    from prometheus_client import Histogram

    requests = Histogram("uservalue_batch_requests", "Requests scored together in one batch",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    seconds = Histogram("uservalue_batch_seconds", "Time to score one batch: features, model, log",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

    def observe(size: int, elapsed: float) -> None:
        requests.observe(size)
        seconds.observe(elapsed)

    return observe


# --- deployment settings -------------------------------------------------------------------------

ENV_OVERRIDES = {
    "USERVALUE_MAX_USERS": "max_users",
    "USERVALUE_MAX_EVENTS": "max_events",
    "USERVALUE_PREDICTION_LOG_DIR": "log_dir",
    "USERVALUE_LOG_FLUSH_RECORDS": "log_flush_records",
    "USERVALUE_LOG_FLUSH_SECONDS": "log_flush_seconds",
    "USERVALUE_BATCH_WAIT_MS": "batch_wait_ms",
}


def serve_settings(environ: dict[str, str] | None = None) -> tuple[ServeParams, Path]:
    """The `serve` section of the project's params.yaml (USERVALUE_PROJECT_DIR, else the working
    directory), each field overridable by its USERVALUE_* variable; relative paths are the project's."""
    from uservalue.errors import ConfigError

    environ = dict(os.environ if environ is None else environ)
    project = Path(environ.get("USERVALUE_PROJECT_DIR", ".")).resolve()
    params_file = Path(environ.get("USERVALUE_PARAMS", project / "params.yaml"))
    base = load_params(params_file).serve if params_file.is_file() else ServeParams()
    overrides = {field_name: environ[var] for var, field_name in ENV_OVERRIDES.items() if environ.get(var)}
    try:
        settings = ServeParams.model_validate({**base.model_dump(), **overrides})
    except ValueError as error:
        given = sorted(var for var in ENV_OVERRIDES if environ.get(var))
        raise ConfigError(f"serve settings ({params_file} section serve, env {given}): {error}") from None
    log_dir = Path(settings.log_dir)
    return settings, log_dir if log_dir.is_absolute() else project / log_dir


class ApiKeyMiddleware:
    """ASGI middleware: with an API key configured, every request but the health probes needs
    `Authorization: Bearer <key>` or `X-API-Key: <key>`; others get 401."""

    def __init__(self, app: Any, key_env: str = "USERVALUE_API_KEY") -> None:
        self.app = app
        self.key = os.environ.get(key_env) or None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        offered = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        if offered and hmac.compare_digest(offered.encode(), self.key.encode()):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "missing or wrong API key",
                           "detail": [{"loc": ["header", "Authorization"],
                                       "msg": "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"}]}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

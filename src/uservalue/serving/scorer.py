"""Online scoring: requests (user ids and/or events) -> p_buy, expected_value and behaviour influence, one
batch at a time, with the online feature engine (features.online, proven equal to the batch SQL)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from uservalue.features.online import EventColumns, concat, event_columns, online_features
from uservalue.models.base import ModelInfo
from uservalue.serving.requests import KEY_SEPARATOR, Event, RequestError, as_utc, events_table, validate_events
from uservalue.serving.store import OnlineStore


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
    users: frozenset[str]  # every user answered: those asked by id and those with events sent
    as_of: dt.datetime | None  # None: the time its batch is scored
    received: dt.datetime
    user_ids: tuple[str, ...] = ()  # asked by id: their stored events, plus any sent with the request
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class ScoredBatch:
    """What one feature query and one forward pass gave a batch of requests."""

    requests: Sequence[ScoreRequest]
    as_of: list[dt.datetime]  # per request
    scored: pd.DataFrame  # one row per answered user: score_features' columns
    request: np.ndarray  # per row of `scored`: the position of its request in `requests`
    errors: dict[int, RequestError]  # per failed request position: its client error (no rows in `scored`)
    user_errors: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # per request: users not scored


class Scorer:
    """A loaded model and a DuckDB connection per thread: requests in, scored users out."""

    def __init__(self, model: Any, info: ModelInfo, max_events: int, max_users: int,
                 store: OnlineStore | None = None) -> None:
        from uservalue import duck

        self.model = model
        self.info = info
        self.max_events = max_events
        self.max_users = max_users
        self.store = store
        # A batch is a few users: intra-op threads only add hand-off costs (measured on 2 cores: the
        # MLP's predict + attribution of one user 33 ms with torch's default threads, 13 ms with one).
        self._root = duck.connect(memory_limit="1GB", threads=1)
        if "torch" in sys.modules:  # a torch model is loaded; never import torch just for this
            sys.modules["torch"].set_num_threads(1)
        # One cursor (DuckDB connection) per thread that scores: it hashes the item and category ids of
        # events sent with a request (the buckets must be DuckDB's hash, as in the batch SQL).
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

    def prepare(self, events: Sequence[Event], as_of: dt.datetime | None, user_ids: Sequence[str] = (),
                received: dt.datetime | None = None) -> ScoreRequest:
        """Validate one request (a RequestError names what is wrong) before it joins a batch."""
        if user_ids and self.store is None:
            raise RequestError(["user_ids"], "this service has no online store: send the users' events", status=400)
        users = validate_events(events, self.model.spec.behaviors, self.max_events, self.max_users, user_ids)
        return ScoreRequest(events=events, users=frozenset(users), as_of=None if as_of is None else as_utc(as_of),
                            received=received or dt.datetime.now(dt.UTC), user_ids=tuple(dict.fromkeys(user_ids)))

    def _request_events(self, requests: Sequence[ScoreRequest]) -> list[EventColumns]:
        """Per request, the events its users are scored from, user ids keyed by request position:
        the stored events of the users asked by id (one store read for the batch) and the events
        sent with it (for that request only)."""
        parts: list[list[EventColumns]] = [[] for _ in requests]
        asked = list(dict.fromkeys(u for r in requests for u in r.user_ids))
        if asked:
            stored, _unknown = self.store.get(asked)  # type: ignore[union-attr]
            for i, request in enumerate(requests):
                if request.user_ids:
                    mine = stored.take(np.isin(stored.user_id, request.user_ids))
                    parts[i].append(_keyed(mine, i))
        sent = [i for i, r in enumerate(requests) if r.events]
        if sent:
            table = events_table([requests[i].events for i in sent], keys=[str(i) for i in sent])
            columns = event_columns(table, con=self._connection())
            for i in sent:
                parts[i].append(columns.take(np.char.startswith(columns.user_id.astype(str), f"{i}{KEY_SEPARATOR}")))
        return [concat(p) for p in parts]

    def score_batch(self, requests: Sequence[ScoreRequest]) -> ScoredBatch:
        """Score several requests with one feature query per distinct as_of and one model call.

        Each request's users get exactly the rows they would get alone: features are computed per
        (request, user) and the model scores rows independently."""
        now = dt.datetime.now(dt.UTC)
        as_of = [r.as_of or now for r in requests]
        events = self._request_events(requests)
        frames = []
        for cutoff in dict.fromkeys(as_of):  # distinct, in order
            members = [i for i, c in enumerate(as_of) if c == cutoff]
            table = online_features(concat([events[i] for i in members]), cutoff, self.model.spec)
            frames.append(table.to_pandas())
        features = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        keys = features["user_id"].str.split(KEY_SEPARATOR, n=1, expand=True)
        position = keys[0].astype(np.int64).to_numpy() if len(features) else np.zeros(0, dtype=np.int64)
        features["user_id"] = keys[1] if len(features) else features["user_id"]
        errors: dict[int, RequestError] = {}
        user_errors: dict[int, list[dict[str, Any]]] = {}
        answered = set(zip(position.tolist(), features["user_id"], strict=True))
        for i, request in enumerate(requests):
            missing = {u for u in request.users if (i, u) not in answered}
            if missing and request.user_ids:  # by id: each unscored user is named in the answer
                sent = set(events[i].user_id.tolist())
                user_errors[i] = [_user_error(request, u, as_of[i], f"{i}{KEY_SEPARATOR}{u}" in sent)
                                  for u in sorted(missing)]
            elif missing:
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
            scored = pd.DataFrame(columns=[*self._answered_columns(), "recency_days"])
        return ScoredBatch(requests, as_of, scored, position, errors, user_errors)

    def score(self, events: Sequence[Event], as_of: dt.datetime | None) -> tuple[dt.datetime, pd.DataFrame]:
        """One request, scored alone: (its as_of, one row per user); a RequestError if it fails."""
        batch = self.score_batch([self.prepare(events, as_of)])
        if batch.errors:
            raise batch.errors[0]
        return batch.as_of[0], batch.scored

    def _answered_columns(self) -> list[str]:
        return ["user_id", "p_buy", "expected_value", *(f"influence_{b}" for b in self.model.spec.behaviors)]

    def response_rows(self, scored: pd.DataFrame, as_of: Sequence[dt.datetime]) -> list[dict[str, Any]]:
        """One answer per scored row; `as_of` per row. features_as_of: the user's latest event used."""
        behaviors = self.model.spec.behaviors
        # Only the answered columns: `scored` also carries every aggregate feature (for the log).
        latest = [(when - dt.timedelta(days=float(days))).isoformat()
                  for when, days in zip(as_of, scored["recency_days"].tolist(), strict=True)]
        rows = []
        for record, features_as_of in zip(scored[self._answered_columns()].to_dict("records"), latest, strict=True):
            rows.append({
                "user_id": record["user_id"],
                "features_as_of": features_as_of,
                "p_buy": float(record["p_buy"]),
                "expected_value": float(record["expected_value"]),
                "horizon_days": int(self.model.horizon_days),
                "model_version": self.info.version,
                "influence": {b: float(record[f"influence_{b}"]) for b in behaviors},
            })
        return rows

    def answers(self, batch: ScoredBatch) -> list[dict[str, Any] | RequestError]:
        """Each request's response body, or its client error."""
        rows = self.response_rows(batch.scored, [batch.as_of[i] for i in batch.request.tolist()])
        per_request: dict[int, list[dict[str, Any]]] = {}
        for position, row in zip(batch.request.tolist(), rows, strict=True):
            per_request.setdefault(position, []).append(row)
        model = {"name": self.info.name, "version": self.info.version}
        answers: list[dict[str, Any] | RequestError] = []
        for i in range(len(batch.requests)):
            if i in batch.errors:
                answers.append(batch.errors[i])
                continue
            answer = {"as_of": batch.as_of[i].isoformat(), "model": model, "predictions": per_request.get(i, [])}
            if i in batch.user_errors:
                answer["errors"] = batch.user_errors[i]
            answers.append(answer)
        return answers

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


def _keyed(events: EventColumns, position: int) -> EventColumns:
    """The events with each user id keyed by its request's position (see KEY_SEPARATOR)."""
    keyed = np.array([f"{position}{KEY_SEPARATOR}{u}" for u in events.user_id.tolist()], dtype=object)
    return dataclasses.replace(events, user_id=keyed)


def _user_error(request: ScoreRequest, user: str, as_of: dt.datetime, has_events: bool) -> dict[str, Any]:
    """Why a user of a by-id request got no prediction (the rest of the request is answered)."""
    loc: list[Any] = ["user_ids", request.user_ids.index(user)] if user in request.user_ids else ["events"]
    if not has_events:
        return {"user_id": user, "loc": loc, "msg": "unknown user: no events stored for this id and none sent"}
    return {"user_id": user, "loc": loc, "msg": f"no event before as_of {as_of.isoformat()}"}

"""Online scoring: requests (user ids and/or events) -> p_buy, expected_value and behaviour influence, one
batch at a time, with the online feature engine (features.online, proven equal to the batch SQL)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from uservalue.features.online import (
    EventColumns,
    FeatureArrays,
    concat,
    events_to_columns,
    online_arrays,
)
from uservalue.models.base import PREDICT_CHUNK, ArrayPredictions, ModelInfo
from uservalue.serving.requests import KEY_SEPARATOR, Event, RequestError, as_utc, validate_events
from uservalue.serving.store import OnlineStore


def score_features(model: Any, features: pd.DataFrame) -> pd.DataFrame:
    """Predictions with influence shares, plus the aggregate features (the monitor watches them)."""
    from uservalue.models.model_input import predict_with_influence

    predictions = predict_with_influence(model, features)
    aggregates = [c for c in model.spec.aggregate_columns() if c in features.columns]
    return pd.concat([predictions.reset_index(drop=True), features[aggregates].reset_index(drop=True)], axis=1)


# Feature rows made a DataFrame at once by score_table: 10^6 users with their sequences are ~3 GiB as pandas,
# ~1 GiB as Arrow. A multiple of models.base.PREDICT_CHUNK, so every row is scored in the same chunk of
# predict_with_influence as when the whole table is one DataFrame: the same numbers, bit for bit.
SCORE_BATCH_ROWS = 16 * PREDICT_CHUNK


def score_table(model: Any, table: pa.Table, batch_rows: int = SCORE_BATCH_ROWS) -> pd.DataFrame:
    """score_features of an Arrow table of feature rows, `batch_rows` rows made a DataFrame at a time (the
    rows in table order; issue 13: the monitor and batch scoring of 10^6 users in bounded memory)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if table.num_rows <= batch_rows:
        return score_features(model, table.to_pandas())
    return pd.concat([score_features(model, table.slice(start, batch_rows).to_pandas())
                      for start in range(0, table.num_rows, batch_rows)], ignore_index=True)


def score_events(model: Any, events: str | Path | pa.Table | pd.DataFrame, as_of: dt.datetime,
                 con: Any = None) -> pd.DataFrame:
    """Score every user with an event before `as_of`: the batch, the service and the monitor use it."""
    from uservalue.features.sql import build_features

    text_columns = tuple(getattr(model.spec, "text_columns", ()))
    if text_columns:  # the pooled item-text columns are joined after the SQL, as featurize does (issue 23)
        from dataclasses import replace

        from uservalue.text.online import with_text_columns

        features = build_features(events, as_of, replace(model.spec, text_columns=()), con=con).to_pandas()
        return score_features(model, with_text_columns(features, events, text_columns, model.spec.text_vectors))
    return score_table(model, build_features(events, as_of, model.spec, con=con))


@dataclass(frozen=True)
class ScoreRequest:
    """One validated /predict call, waiting to be scored (alone or in a batch)."""

    events: Sequence[Event]
    users: frozenset[str]  # every user answered: those asked by id and those with events sent
    as_of: dt.datetime | None  # None: the time its batch is scored
    received: dt.datetime
    user_ids: tuple[str, ...] = ()  # asked by id: their stored events, plus any sent with the request
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    explain: str | None = None  # "effect": each user's per-event effects too (models.influence)


@dataclass(frozen=True)
class ScoredRows:
    """One row per answered user, as arrays: the model's numbers and the aggregate features (the
    prediction log keeps them for the monitor)."""

    user_id: np.ndarray  # object (str)
    predictions: ArrayPredictions
    aggregates: dict[str, np.ndarray]  # the spec's aggregate columns, in the feature engine's types
    behaviors: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.user_id)

    def columns(self) -> dict[str, np.ndarray]:
        """score_features' columns, in its order."""
        influence = self.predictions.influence
        return {"user_id": self.user_id, "p_buy": self.predictions.p_buy,
                "expected_value": self.predictions.expected_value,
                **{f"influence_{b}": influence[:, i] for i, b in enumerate(self.behaviors)}, **self.aggregates}


@dataclass
class ScoredBatch:
    """What one feature computation and one model call gave a batch of requests."""

    requests: Sequence[ScoreRequest]
    as_of: list[dt.datetime]  # per request
    rows: ScoredRows  # one row per answered user
    request: np.ndarray  # per row of `rows`: the position of its request in `requests`
    errors: dict[int, RequestError]  # per failed request position: its client error (no rows in `rows`)
    user_errors: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # per request: users not scored
    effects: dict[int, dict[str, Any]] = field(default_factory=dict)  # per row asked to explain: its effects

    def __len__(self) -> int:
        return len(self.rows)

    @functools.cached_property
    def scored(self) -> pd.DataFrame:
        """The rows as score_features' DataFrame (built on first use: answers() never needs it)."""
        return pd.DataFrame(self.rows.columns(), copy=False)


class Scorer:
    """A loaded model and the online store: requests in, scored users out. No SQL per request: the
    features come from the numpy engine (features.online), the model reads its arrays."""

    def __init__(self, model: Any, info: ModelInfo, max_events: int, max_users: int,
                 store: OnlineStore | None = None) -> None:
        self.model = model
        self.info = info
        self.max_events = max_events
        self.max_users = max_users
        self.store = store
        # A batch is a few users: intra-op threads only add hand-off costs (measured on 2 cores: the
        # MLP's predict + attribution of one user 33 ms with torch's default threads, 13 ms with one).
        if "torch" in sys.modules:  # a torch model is loaded; never import torch just for this
            sys.modules["torch"].set_num_threads(1)
        self._warm_up()

    def _warm_up(self) -> None:
        # The first forward pass pays for lazy initialisation (and a deep model's TorchScript trace):
        # pay it at start-up, not in a client's request.
        now = dt.datetime.now(dt.UTC)
        events = [Event(user_id="warm-up", ts=now - dt.timedelta(days=1), behavior=b) for b in self.model.spec.behaviors]
        self.score(events, now)

    def prepare(self, events: Sequence[Event], as_of: dt.datetime | None, user_ids: Sequence[str] = (),
                received: dt.datetime | None = None, explain: str | None = None) -> ScoreRequest:
        """Validate one request (a RequestError names what is wrong) before it joins a batch."""
        if user_ids and self.store is None:
            raise RequestError(["user_ids"], "this service has no online store: send the users' events", status=400)
        if explain not in EXPLAIN:
            raise RequestError(["explain"], f"expected one of {[e for e in EXPLAIN if e]} or null, got {explain!r}")
        users = validate_events(events, self.model.spec.behaviors, self.max_events, self.max_users, user_ids)
        return ScoreRequest(events=events, users=frozenset(users), as_of=None if as_of is None else as_utc(as_of),
                            received=received or dt.datetime.now(dt.UTC), user_ids=tuple(dict.fromkeys(user_ids)),
                            explain=explain)

    def _request_events(self, requests: Sequence[ScoreRequest]) -> list[EventColumns]:
        """Per request, the events its users are scored from, user ids keyed by request position:
        the stored events of the users asked by id (one store read for the batch) and the events
        sent with it (for that request only)."""
        parts: list[list[EventColumns]] = [[] for _ in requests]
        asking = [i for i, r in enumerate(requests) if r.user_ids]
        if asking:
            asked = list(dict.fromkeys(u for i in asking for u in requests[i].user_ids))
            stored, _unknown = self.store.get(asked)  # type: ignore[union-attr]
            for i in asking:
                # One asking request owns every stored event read: no per-event membership test.
                mine = stored if len(asking) == 1 else stored.take(np.isin(stored.user_id, requests[i].user_ids))
                parts[i].append(_keyed(mine, i))
        for i, request in enumerate(requests):
            if request.events:
                parts[i].append(self._sent_events(request.events, i))
        return [concat(p) for p in parts]

    def _sent_events(self, events: Sequence[Event], position: int) -> EventColumns:
        """The events a request sent, as the online store would hold them, keyed by its position.
        No SQL: features.online.events_to_columns computes DuckDB's epoch() and the bucket hash."""
        return events_to_columns(
            user_id=[f"{position}{KEY_SEPARATOR}{e.user_id}" for e in events],
            ts_micros=[(as_utc(e.ts) - _EPOCH) // _MICROSECOND for e in events],
            behavior=[e.behavior for e in events],
            item_id=[e.item_id for e in events],
            category_id=[e.category_id for e in events],
            amount=[e.amount for e in events],
        )

    def score_batch(self, requests: Sequence[ScoreRequest]) -> ScoredBatch:
        """Score several requests with one feature computation per distinct as_of and one model call.

        Each request's users get exactly the rows they would get alone: features are computed per
        (request, user) and the model scores rows independently."""
        now = dt.datetime.now(dt.UTC)
        as_of = [r.as_of or now for r in requests]
        events = self._request_events(requests)
        parts = []
        for cutoff in dict.fromkeys(as_of):  # distinct, in order
            members = [i for i, c in enumerate(as_of) if c == cutoff]
            parts.append(online_arrays(concat([events[i] for i in members]), cutoff, self.model.spec))
        features = FeatureArrays.concat(parts)
        position, user_id = _split_keys(features.user_id)
        features = features.with_user_ids(user_id)
        errors, user_errors = self._unscored(requests, as_of, events, position, user_id)
        if errors:  # a failed request is answered by its error alone: drop its other users too
            keep = np.flatnonzero(~np.isin(position, list(errors)))
            features, position = features.take(keep), position[keep]
        predictions = self.model.predict_arrays(features) if len(features) else _no_predictions(self.model.spec)
        rows = ScoredRows(features.user_id, predictions, features.aggregates, tuple(self.model.spec.behaviors))
        explaining = [i for i, r in enumerate(requests) if r.explain == "effect"]
        effects = self._effects(features, np.flatnonzero(np.isin(position, explaining))) if explaining else {}
        return ScoredBatch(requests, as_of, rows, position, errors, user_errors, effects)

    def _effects(self, features: FeatureArrays, rows: np.ndarray) -> dict[int, dict[str, Any]]:
        """Per row in `rows`: the change in expected_value and p_buy one more event of each behaviour
        at as_of would make, null for a behaviour the model never saw (models.influence.user_effects;
        one model call for all of them)."""
        from uservalue.models import influence

        if not len(rows):
            return {}
        answers = influence.user_effects(self.model, features.take(rows))
        return {int(r): answer for r, answer in zip(rows.tolist(), answers, strict=True)}

    def _unscored(self, requests: Sequence[ScoreRequest], as_of: list[dt.datetime], events: list[EventColumns],
                  position: np.ndarray, user_id: np.ndarray,
                  ) -> tuple[dict[int, RequestError], dict[int, list[dict[str, Any]]]]:
        """Requests that fail (a user sent by events without history before as_of: a 422) and, per
        request by id, the users left unscored (named in its answer)."""
        errors: dict[int, RequestError] = {}
        user_errors: dict[int, list[dict[str, Any]]] = {}
        answered = set(zip(position.tolist(), user_id.tolist(), strict=True))
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
        return errors, user_errors

    def score(self, events: Sequence[Event], as_of: dt.datetime | None) -> tuple[dt.datetime, pd.DataFrame]:
        """One request, scored alone: (its as_of, one row per user); a RequestError if it fails."""
        batch = self.score_batch([self.prepare(events, as_of)])
        if batch.errors:
            raise batch.errors[0]
        return batch.as_of[0], batch.scored

    def response_rows(self, scored: pd.DataFrame | ScoredRows, as_of: Sequence[dt.datetime]) -> list[dict[str, Any]]:
        """One answer per scored row; `as_of` per row. features_as_of: the user's latest event used."""
        if isinstance(scored, pd.DataFrame):
            user_id = scored["user_id"].to_numpy()
            p_buy, value = scored["p_buy"].to_numpy(), scored["expected_value"].to_numpy()
            influence = scored[[f"influence_{b}" for b in self.model.spec.behaviors]].to_numpy()
            recency = scored["recency_days"].to_numpy()
        else:
            user_id, recency = scored.user_id, scored.aggregates["recency_days"]
            p_buy, value, influence = scored.predictions.p_buy, scored.predictions.expected_value, \
                scored.predictions.influence
        behaviors = self.model.spec.behaviors
        horizon, version = int(self.model.horizon_days), self.info.version
        # Plain Python floats in one conversion per array, not one numpy scalar per value.
        return [{
            "user_id": user,
            "features_as_of": (when - dt.timedelta(days=days)).isoformat(),
            "p_buy": p,
            "expected_value": v,
            "horizon_days": horizon,
            "model_version": version,
            "influence": dict(zip(behaviors, shares, strict=True)),
        } for user, when, days, p, v, shares in zip(
            user_id.tolist(), as_of, np.asarray(recency, dtype=np.float64).tolist(),
            np.asarray(p_buy, dtype=np.float64).tolist(), np.asarray(value, dtype=np.float64).tolist(),
            np.asarray(influence, dtype=np.float64).tolist(), strict=True)]

    def answers(self, batch: ScoredBatch) -> list[dict[str, Any] | RequestError]:
        """Each request's response body, or its client error."""
        rows = self.response_rows(batch.rows, [batch.as_of[i] for i in batch.request.tolist()])
        for index, effect in batch.effects.items():
            rows[index]["effect"] = effect
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

    def log_frame(self, *batches: ScoredBatch, skip: Sequence[Sequence[int]] | None = None) -> pd.DataFrame:
        """The prediction log's rows for one or more batches, in one frame: each answered user with its
        request's time and id; `skip`, per batch: positions of requests whose rows are left out."""
        parts: list[dict[str, np.ndarray]] = []
        for k, batch in enumerate(batches):
            requests, index = batch.requests, batch.request
            # Per request once, then spread to its rows: one conversion whatever the number of users.
            columns = {
                "request_time": _utc_nanos([r.received for r in requests])[index],
                "request_id": np.array([r.request_id for r in requests], dtype=object)[index],
                "as_of": _utc_nanos(batch.as_of)[index],
                **batch.rows.columns(),
            }
            if skip is not None and len(skip[k]):
                keep = ~np.isin(index, np.asarray(skip[k], dtype=np.int64))
                columns = {name: values[keep] for name, values in columns.items()}
            parts.append(columns)
        columns = parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        n = len(columns["request_id"])
        return pd.DataFrame({
            "request_time": _nanos_index(columns.pop("request_time")),
            "request_id": columns.pop("request_id"),
            "as_of": _nanos_index(columns.pop("as_of")),
            "model_name": np.full(n, self.info.name, dtype=object),
            "model_version": np.full(n, self.info.version, dtype=object),
            **columns,
            "horizon_days": np.full(n, int(self.model.horizon_days), dtype=np.int64),
        }, copy=False)


EXPLAIN = (None, "effect")  # what a /predict request may ask explained beyond the shares
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


def _utc_nanos(times: Sequence[dt.datetime]) -> np.ndarray:
    """Nanoseconds since the epoch (int64) of each time, read as UTC."""
    return np.array([(as_utc(t) - _EPOCH) // _MICROSECOND for t in times], dtype=np.int64) * 1000


def _nanos_index(nanos: np.ndarray) -> pd.DatetimeIndex:
    """pd.to_datetime(times, utc=True) (datetime64[ns, UTC]) of _utc_nanos' numbers, at a third of its fixed cost."""
    return pd.DatetimeIndex(nanos.view("datetime64[ns]")).tz_localize("UTC")


def _split_keys(keyed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(request position, user id) of each `<position><KEY_SEPARATOR><user id>` key."""
    split = [k.split(KEY_SEPARATOR, 1) for k in keyed.tolist()]
    position = np.fromiter((int(p) for p, _ in split), dtype=np.int64, count=len(split))
    return position, np.array([u for _, u in split], dtype=object)


def _no_predictions(spec: Any) -> ArrayPredictions:
    return ArrayPredictions(np.zeros(0), np.zeros(0), np.zeros((0, len(spec.behaviors))))


def _keyed(events: EventColumns, position: int) -> EventColumns:
    """The events with each user id keyed by its request's position (see KEY_SEPARATOR): one key
    built per user, not per event."""
    keys: dict[str, str] = {}
    keyed = np.array([keys.get(u) or keys.setdefault(u, f"{position}{KEY_SEPARATOR}{u}")
                      for u in events.user_id.tolist()], dtype=object)
    return dataclasses.replace(events, user_id=keyed)


def _user_error(request: ScoreRequest, user: str, as_of: dt.datetime, has_events: bool) -> dict[str, Any]:
    """Why a user of a by-id request got no prediction (the rest of the request is answered)."""
    loc: list[Any] = ["user_ids", request.user_ids.index(user)] if user in request.user_ids else ["events"]
    if not has_events:
        return {"user_id": user, "loc": loc, "msg": "unknown user: no events stored for this id and none sent"}
    return {"user_id": user, "loc": loc, "msg": f"no event before as_of {as_of.isoformat()}"}

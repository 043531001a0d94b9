"""POST /recommend: the top-k items of one user, asked by id (their events in the online store) and/or by
the events sent, from the packaged recommender (registry model recs.model_name); items the user bought are
left out unless `exclude_bought` is false."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from uservalue import limits
from uservalue.serving.bento_model import MODEL_NAME_LABEL, RUN_LABEL, TYPE_LABEL, VERSION_LABEL
from uservalue.serving.requests import (
    Event,
    Identifier,
    RequestError,
    Time,
    as_of_time,
    events_table,
)
from uservalue.serving.store import OnlineStore

MAX_K = 100  # items per /recommend answer


class RecommendRequest(BaseModel):
    """The body of POST /recommend: one user, by id and/or by events (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    user_id: Identifier | None = Field(None, description="the user, with their stored events (with events: both)")
    events: list[Event] = Field(default_factory=list, description="events of one user (with user_id: of that user, "
                                                                  "added for this request only)")
    k: int = Field(20, ge=1, le=MAX_K, strict=True, description="how many items")
    as_of: Time | None = Field(None, description=f"recommend at this time: later events are ignored (default: now), "
                                                 f"from {limits.TS_MIN.date()} to {limits.AS_OF_MAX.date()}")
    exclude_bought: bool = Field(True, strict=True, description="leave out the items the user bought")

    @field_validator("as_of")
    @classmethod
    def _as_of_in_range(cls, value: dt.datetime | None) -> dt.datetime | None:
        return as_of_time(value)


def recommender_dir(bento_model_path: str | Path) -> Path:
    """Where the saved Recommender sits inside an imported MLflow model (the pyfunc's artifact)."""
    return Path(bento_model_path) / "mlflow_model" / "artifacts" / "model"


class Recommending:
    """The /recommend handler: the user's history from the store and the request, then the recommender."""

    def __init__(self, recommender: Any | None, info: dict[str, str], store: OnlineStore, max_events: int) -> None:
        self.recommender, self.info, self.store, self.max_events = recommender, info, store, max_events

    @classmethod
    def from_bento_model(cls, bento_model: Any | None, store: OnlineStore, max_events: int) -> Recommending:
        if bento_model is None:
            return cls(None, {}, store, max_events)
        from uservalue.recs.base import load_recommender

        labels = dict(bento_model.info.labels)
        info = {"model_name": labels.get(MODEL_NAME_LABEL, str(bento_model.tag.name)),
                "model_version": labels.get(VERSION_LABEL, str(bento_model.tag.version)),
                "run_id": labels.get(RUN_LABEL, ""), "model_type": labels.get(TYPE_LABEL, ""),
                "bento_model": str(bento_model.tag)}
        return cls(load_recommender(recommender_dir(bento_model.path)), info, store, max_events)

    def recommend(self, user_id: str | None, events: Sequence[Event], k: int, as_of: dt.datetime | None,
                  exclude_bought: bool) -> dict[str, Any]:
        if self.recommender is None:
            raise RequestError(["user_id"], "no recommender is packaged in this service (run the train_recs "
                                            "and package stages)", status=503)
        user = self._user(user_id, events)
        when = as_of or dt.datetime.now(dt.UTC)
        history = [events_table([events]).to_pandas()] if events else []
        if user_id is not None:
            stored, unknown = self.store.get([user_id])
            if unknown and not events:
                raise RequestError(["user_id"], f"unknown user {user_id!r}: no stored events; send their events",
                                   status=404)
            if len(stored):
                history.append(pd.DataFrame({"user_id": stored.user_id, "ts": pd.to_datetime(stored.t, unit="s", utc=True),
                                             "behavior": stored.behavior, "item_id": stored.item_id,
                                             "category_id": stored.category_id}))
        frame = pd.concat(history, ignore_index=True) if history else pd.DataFrame()
        if not frame.empty:
            frame = frame.loc[frame["ts"] < pd.Timestamp(when)]
        found = self.recommender.recommend(frame, k, exclude_bought) if not frame.empty else []
        items, scores = (found[0].items, found[0].scores) if found else self.recommender.popular(k)
        return {"user_id": user, "as_of": when.isoformat(),
                "items": [{"item_id": i, "score": s} for i, s in zip(items, scores, strict=True)],
                "model_version": self.info["model_version"], "model_name": self.info["model_name"]}

    def _user(self, user_id: str | None, events: Sequence[Event]) -> str:
        if user_id is None and not events:
            raise RequestError(["user_id"], "send user_id or the user's events")
        if len(events) > self.max_events:
            raise RequestError(["events"], f"{len(events)} events; at most {self.max_events} per request", status=413)
        if len(events) > limits.MAX_EVENTS_PER_USER:
            raise RequestError(["events"], f"{len(events)} events of one user; at most {limits.MAX_EVENTS_PER_USER}",
                               status=413)
        user = user_id if user_id is not None else events[0].user_id
        for index, event in enumerate(events):
            if event.user_id != user:
                raise RequestError(["events", index, "user_id"], f"{event.user_id!r}; expected every event of one "
                                                                 f"user, {user!r}")
        return user

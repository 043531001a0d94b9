"""What /predict and /events calls send (user ids, events), their validation, and the canonical events
table of the events sent."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Annotated, Any

import pyarrow as pa
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from uservalue.errors import UservalueError
from uservalue.schema import EVENTS_SCHEMA

# Batched requests' users are featurized as "<request>\x1f<user id>", so that the same user id in
# two requests of one batch stays two users (each with its own events); the key is stripped again
# before the model sees the id.
KEY_SEPARATOR = "\x1f"


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


class LoggedEvent(Event):
    """An event sent to /events: stored for the user and appended to the event log."""

    event_id: Identifier | None = Field(None, description="the client's id: an event re-sent with it counts once")


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


def validate_events(events: Sequence[Event], behaviors: Sequence[str], max_events: int, max_users: int,
                    user_ids: Sequence[str] = ()) -> set[str]:
    """The request's users (asked by id or sent events), or a RequestError naming what the model
    cannot score."""
    if not events and not user_ids:
        raise RequestError(["events"], "must hold at least one event (or send user_ids)")
    if len(events) > max_events:
        raise RequestError(["events"], f"{len(events)} events; at most {max_events} per request", status=413)
    known = set(behaviors)
    for index, event in enumerate(events):
        if event.behavior not in known:
            raise RequestError(["events", index, "behavior"],
                               f"unknown behaviour {event.behavior!r}; expected one of {list(behaviors)}")
    users = {event.user_id for event in events} | set(user_ids)
    if len(users) > max_users:
        raise RequestError(["user_ids" if user_ids else "events"], f"{len(users)} users; at most {max_users} per request",
                           status=413)
    return users


def events_table(requests: Sequence[Sequence[Event]], keys: Sequence[str] | None = None) -> pa.Table:
    """The events of one or more requests as the canonical events table (the feature function's
    input); with `keys`, each user id is prefixed by its request's key (see KEY_SEPARATOR)."""
    columns = {name: [getattr(e, name) for events in requests for e in events] for name in EVENTS_SCHEMA.names}
    if keys is not None:
        columns["user_id"] = [f"{key}{KEY_SEPARATOR}{e.user_id}" for key, events in zip(keys, requests, strict=True)
                              for e in events]
    return pa.table(columns, schema=EVENTS_SCHEMA)

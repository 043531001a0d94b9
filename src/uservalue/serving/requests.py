"""What /predict and /events calls send (user ids, events), their validation, the canonical events table of
the events sent, and the error bodies the service answers with. Every bound comes from uservalue.limits,
the one set of rules the pipeline's validation gate shares."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from uservalue import limits
from uservalue.errors import UservalueError
from uservalue.schema import DEFAULT_BEHAVIORS, EVENTS_SCHEMA, MONEY_BEHAVIORS, RETURN

# Batched requests' users are featurized as "<request>\x1f<user id>", so that the same user id in
# two requests of one batch stays two users (each with its own events); the key is stripped again
# before the model sees the id. limits.ID_PATTERN keeps the separator out of every id.
KEY_SEPARATOR = "\x1f"

# The behaviour vocabulary, as an enum in the OpenAPI schema: the default behaviours and `return` (a
# transaction log's returns, data.behaviors). A model trained on fewer is checked again in validate_events.
BEHAVIORS: tuple[str, ...] = (*DEFAULT_BEHAVIORS, RETURN)
Behavior = Literal[BEHAVIORS]  # type: ignore[valid-type]
_MONEY = " or ".join(repr(b) for b in MONEY_BEHAVIORS)


def as_utc(value: dt.datetime) -> dt.datetime:
    """Times without an offset are UTC (the canonical event table's zone)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _id_to_str(value: Any) -> Any:
    # JSON clients send ids as numbers as often as strings; both name the same user or item.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


_ID_STRING = {"type": "string", "minLength": limits.ID_MIN_LENGTH, "maxLength": limits.ID_MAX_LENGTH,
              "pattern": limits.ID_PATTERN}
# A string of limits.ID_MIN_LENGTH..ID_MAX_LENGTH characters without control characters, or an integer
# (read as its decimal string). The constraint goes before the BeforeValidator: pydantic drops the
# pattern from the JSON Schema otherwise.
Identifier = Annotated[str, StringConstraints(min_length=limits.ID_MIN_LENGTH, max_length=limits.ID_MAX_LENGTH,
                                              pattern=limits.ID_PATTERN),
                       BeforeValidator(_id_to_str), WithJsonSchema({"anyOf": [_ID_STRING, {"type": "integer"}]})]


def _time_text(value: Any) -> Any:
    """Times come as ISO 8601 text: a bare number (pydantic would read it as Unix seconds) is refused."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        # ValueError, not TypeError: pydantic reports only the former as the field's validation error.
        raise ValueError(f"{value!r} is a number; expected an ISO 8601 time string, e.g. 1998-01-01T00:00:00Z")  # noqa: TRY004
    return value


Time = Annotated[dt.datetime, BeforeValidator(_time_text)]


def _bounded_time(value: dt.datetime, latest: dt.datetime, what: str) -> dt.datetime:
    value = as_utc(value)
    if not limits.TS_MIN <= value <= latest:
        raise ValueError(f"{value.isoformat()} is out of range; expected {what} between "
                         f"{limits.TS_MIN.isoformat()} and {latest.isoformat()}")
    return value


def event_time(value: dt.datetime) -> dt.datetime:
    """An event's time in UTC, not before limits.TS_MIN and not in the future (limits.CLOCK_SKEW)."""
    return _bounded_time(value, limits.latest_event_time(), f"an event time (not in the future, {limits.CLOCK_SKEW} "
                                                            f"of clock skew tolerated)")


def as_of_time(value: dt.datetime | None) -> dt.datetime | None:
    """A request's as_of in UTC, within [limits.TS_MIN, limits.AS_OF_MAX]."""
    return None if value is None else _bounded_time(value, limits.AS_OF_MAX, "as_of")


class Event(BaseModel):
    """One behaviour event, as a client sends it (the canonical event table's columns)."""

    model_config = ConfigDict(extra="forbid")

    user_id: Identifier
    ts: Time = Field(description=f"ISO 8601 time, without an offset read as UTC; from "
                                        f"{limits.TS_MIN.date()} to now (+{limits.CLOCK_SKEW} clock skew)")
    behavior: Behavior = Field(description="one of the model's behaviours")  # type: ignore[valid-type]
    item_id: Identifier | None = None
    category_id: Identifier | None = None
    quantity: float = Field(1.0, ge=0, le=limits.QUANTITY_MAX, allow_inf_nan=False, strict=True)
    amount: float = Field(0.0, ge=0, le=limits.AMOUNT_MAX, allow_inf_nan=False, strict=True,
                          description=f"money spent (or given back): 0 unless behavior is {_MONEY}")

    @field_validator("ts")
    @classmethod
    def _ts_in_range(cls, value: dt.datetime) -> dt.datetime:
        return event_time(value)

    @field_validator("amount")
    @classmethod
    def _amount_only_for_money(cls, value: float, info: ValidationInfo) -> float:
        # The validation gate's rule (schema.MONEY_BEHAVIORS): purchases and returns carry an amount.
        behavior = info.data.get("behavior")
        if value != 0 and behavior is not None and behavior not in MONEY_BEHAVIORS:
            raise ValueError(f"{value} for a {behavior!r} event; expected 0 unless behavior is {_MONEY}")
        return value


class LoggedEvent(Event):
    """An event sent to /events: stored for the user and appended to the event log."""

    event_id: Identifier | None = Field(None, description="the client's id: an event re-sent with it counts once")


class PredictRequest(BaseModel):
    """The body of POST /predict (unknown keys are refused, as in an event)."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[Identifier] = Field(default_factory=list, description="users scored from their stored events")
    events: list[Event] = Field(default_factory=list, description="events of users to score (with user_ids: "
                                                                  "added for this request only)")
    as_of: Time | None = Field(None, description=f"scoring time (default: now), from "
                                                        f"{limits.TS_MIN.date()} to {limits.AS_OF_MAX.date()}")
    explain: Literal["effect"] | None = Field(
        None, description="'effect': per user, the change in expected_value and p_buy one more event of each "
                          "behaviour at as_of would make, besides the shares in `influence`")

    @field_validator("as_of")
    @classmethod
    def _as_of_in_range(cls, value: dt.datetime | None) -> dt.datetime | None:
        return as_of_time(value)


class EventsRequest(BaseModel):
    """The body of POST /events."""

    model_config = ConfigDict(extra="forbid")

    events: list[LoggedEvent] = Field(min_length=1, description="new events; an event_id counts once")


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description="where: the field's path in the body, or the header")
    msg: str = Field(description="what is wrong and what was expected")


class ErrorBody(BaseModel):
    """Every 4xx the service answers: one line, and each problem with its location."""

    error: str
    detail: list[ErrorDetail]


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
    per_user = Counter(event.user_id for event in events)
    if per_user and (busiest := max(per_user, key=per_user.__getitem__)) and \
            per_user[busiest] > limits.MAX_EVENTS_PER_USER:
        raise RequestError(["events"], f"{per_user[busiest]} events of user {busiest!r}; at most "
                                       f"{limits.MAX_EVENTS_PER_USER} per user and request", status=413)
    users = set(per_user) | set(user_ids)
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


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs every request its input validation refuses at ERROR with a traceback (20 MB for 8.6k
    bad requests). A client's mistake is not the server's error: such a record becomes one INFO line
    naming the problem; any other record passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not _is_client_error(error):
            return True
        where = record.getMessage()
        record.msg, record.args = "%s: client error: %s", (where, _one_line(error))
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return True


def _is_client_error(error: BaseException) -> bool:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return True
    status = getattr(getattr(error, "error_code", None), "value", None)  # BentoMLException (bad JSON: 400)
    return isinstance(status, int) and 400 <= status < 500


def _one_line(error: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors(include_input=False)]
        return f"{len(problems)} invalid field(s): " + "; ".join(problems[:5])[:500]
    return " ".join(str(error).split())[:500]


# The error answers of each route (BentoML's generated spec declares `detail` a string, and neither 401,
# 413 nor 422): what the service sends, documented.
ERROR_RESPONSES: dict[str, dict[int, str]] = {
    "/predict": {400: "a field or the JSON body is invalid (detail names each field)",
                 401: "missing or wrong API key (when USERVALUE_API_KEY is set)",
                 413: "the body, users or events are over the limits (uservalue.limits, serve.max_*)",
                 415: "the Content-Type is not application/json",
                 422: "a user has no event before as_of, or the model's prediction is not finite",
                 500: "an unexpected server error (the request alone; never caused by another request)"},
    "/recommend": {400: "a field or the JSON body is invalid, or the events are of more than one user (detail names each field)",
                   401: "missing or wrong API key (when USERVALUE_API_KEY is set)",
                   404: "user_id is not in the online store and no events were sent",
                   413: "the body or the events are over the limits (uservalue.limits, serve.max_events)",
                   415: "the Content-Type is not application/json",
                   503: "no recommender is packaged in this service",
                   500: "an unexpected server error"},
    "/events": {400: "a field or the JSON body is invalid (detail names each field)",
                401: "missing or wrong API key (when USERVALUE_API_KEY is set)",
                413: "the body or the events are over the limits (uservalue.limits, serve.max_events)",
                415: "the Content-Type is not application/json",
                500: "an unexpected server error"},
    "/metadata": {400: "the body is not a JSON object",
                  401: "missing or wrong API key (when USERVALUE_API_KEY is set)",
                  413: "the body is over limits.MAX_BODY_BYTES",
                  415: "the Content-Type is not application/json",
                  500: "an unexpected server error"},
    "/metrics": {401: "missing or wrong API key (when USERVALUE_API_KEY is set)"},
}
_REF = "#/components/schemas/{model}"


def openapi_contract(spec: dict[str, Any], request_models: Mapping[str, type[BaseModel]] | None = None) -> dict[str, Any]:
    """BentoML's generated OpenAPI document with the error responses each route really sends
    (ERROR_RESPONSES, body ErrorBody); the request bodies (and their enum, bounds and pattern) are
    already the request models', except the optional fields BentoML flattens from `X | None` to X's
    bare type: those are put back from `request_models` (path -> the route's input model)."""
    for path, model in (request_models or {}).items():
        for operation in spec.get("paths", {}).get(path, {}).values():
            _optional_fields_from_model(operation.get("requestBody", {}), model)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorBody.model_json_schema(ref_template=_REF)
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorBody"] = error_schema
    schemas["ServerError"] = {"type": "object", "required": ["error"], "title": "ServerError",
                              "properties": {"error": {"type": "string"}}}
    for path, statuses in ERROR_RESPONSES.items():
        for operation in spec.get("paths", {}).get(path, {}).values():
            # BentoML's 404 and its string-detail error shapes are never sent here; keys as strings.
            responses = {str(code): answer for code, answer in operation.get("responses", {}).items()
                         if str(code) == "200"}
            operation["responses"] = responses
            _nullable_defaults(operation.get("requestBody", {}))
            for status, description in statuses.items():
                body = "ServerError" if status >= 500 else "ErrorBody"  # BentoML's 500: {"error"} only
                responses[str(status)] = {"description": description, "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model=body)}}}}
    return spec


def _optional_fields_from_model(request_body: dict[str, Any], model: type[BaseModel]) -> None:
    """Each `X | None` field's schema as the model declares it (e.g. Identifier's string-or-integer), in
    place of BentoML's flattened one; `_nullable_defaults` then writes its null branch as OpenAPI 3.0's."""
    declared = model.model_json_schema(ref_template=_REF).get("properties", {})
    for media in request_body.get("content", {}).values():
        properties = media.get("schema", {}).get("properties", {})
        for name, schema in declared.items():
            if name in properties and {"type": "null"} in schema.get("anyOf", []):
                properties[name] = dict(schema)


def _nullable_defaults(request_body: dict[str, Any]) -> None:
    """BentoML flattens `X | None` top-level fields to X; they accept null (their default): say so. A field
    it leaves as `anyOf [..., {"type": "null"}]` (e.g. `Identifier | None`) gets the OpenAPI 3.0 form of
    the same thing: the other branches, `nullable: true` (3.0 has no null type)."""
    for media in request_body.get("content", {}).values():
        for prop in media.get("schema", {}).get("properties", {}).values():
            branches = prop.get("anyOf")
            if branches is not None and {"type": "null"} in branches:
                kept = [branch for branch in branches if branch != {"type": "null"}]
                if len(kept) == 1:
                    del prop["anyOf"]
                    prop.update(kept[0])
                else:
                    prop["anyOf"] = kept
                prop["nullable"] = True
            elif "default" in prop and prop["default"] is None and "anyOf" not in prop:
                prop["nullable"] = True

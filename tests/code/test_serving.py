"""The service's library side without a server: request validation, the prediction log, settings."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from uservalue import limits
from uservalue.errors import ConfigError
from uservalue.schema import EVENTS_SCHEMA, MONEY_BEHAVIORS, RETURN
from uservalue.serving.auth import offered_key
from uservalue.serving.prediction_log import PredictionLog, finite_rows, read_prediction_log
from uservalue.serving.requests import (
    ClientErrorLogFilter,
    Event,
    EventsRequest,
    LoggedEvent,
    PredictRequest,
    RequestError,
    events_table,
    openapi_contract,
    validate_events,
)
from uservalue.serving.settings import serve_settings

BEHAVIORS = ("view", "fav", "cart", "buy")


def _event(**overrides) -> Event:
    return Event.model_validate({"user_id": "u1", "ts": "1997-03-01T10:00:00Z", "behavior": "buy", **overrides})


def test_event_reads_json_as_a_client_sends_it() -> None:
    event = Event.model_validate({"user_id": 42, "ts": "1997-03-01T10:00:00", "behavior": "cart", "item_id": 7})
    assert event.user_id == "42" and event.item_id == "7"
    assert event.ts == dt.datetime(1997, 3, 1, 10, tzinfo=dt.UTC)  # no offset: UTC
    assert event.quantity == 1.0 and event.amount == 0.0
    shifted = _event(ts="1997-03-01T12:00:00+02:00")
    assert shifted.ts == dt.datetime(1997, 3, 1, 10, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"amount": -1.0}, "amount", "greater than or equal to 0"),
        ({"amount": float("nan")}, "amount", "finite"),
        ({"ts": "yesterday"}, "ts", "datetime"),
        ({"user_id": ""}, "user_id", "at least 1"),
        ({"colour": "red"}, "colour", "Extra inputs"),
        # uservalue.limits, shared with the validation gate (issue 19)
        ({"amount": 1.7e308}, "amount", f"less than or equal to {limits.AMOUNT_MAX:.0f}"),
        ({"amount": "3"}, "amount", "valid number"),
        ({"quantity": limits.QUANTITY_MAX * 10}, "quantity", "less than or equal to"),
        ({"behavior": "view", "amount": 999}, "amount", "expected 0 unless behavior is 'buy' or 'return'"),
        ({"behavior": "cart", "amount": 5}, "amount", "expected 0 unless behavior is 'buy' or 'return'"),
        ({"behavior": "return", "amount": -1.0}, "amount", "greater than or equal to 0"),
        ({"behavior": "click"}, "behavior", "'view', 'fav', 'cart', 'buy' or 'return'"),
        ({"ts": "1400-01-01"}, "ts", "out of range"),
        ({"ts": "0001-01-01T00:00:00Z"}, "ts", "out of range"),
        ({"ts": "2999-01-01T00:00:00Z"}, "ts", "not in the future"),
        ({"ts": 0}, "ts", "ISO 8601 time string"),
        ({"user_id": "a\x00b"}, "user_id", "pattern"),
        ({"user_id": "a\x1fb"}, "user_id", "pattern"),
        ({"user_id": "u" * (limits.ID_MAX_LENGTH + 1)}, "user_id", f"at most {limits.ID_MAX_LENGTH}"),
        ({"item_id": "i\x00"}, "item_id", "pattern"),
    ],
)
def test_event_errors_name_the_field(change: dict, field: str, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _event(**change)
    error = caught.value.errors()[0]
    assert error["loc"] == (field,) and problem in error["msg"]


def test_every_money_behaviour_carries_an_amount_as_the_gate_allows() -> None:
    # schema.MONEY_BEHAVIORS (purchases and returns, the validation gate's rule) carry an amount, in /predict
    # and /events alike; a model trained without returns refuses the behaviour itself (validate_events).
    for behavior in MONEY_BEHAVIORS:
        event = {"user_id": "u1", "ts": "1997-03-01T10:00:00Z", "behavior": behavior, "amount": 12.5, "quantity": 2}
        assert LoggedEvent.model_validate({**event, "event_id": "e1"}).amount == 12.5
        request = PredictRequest.model_validate_json(json.dumps({"events": [event], "as_of": "1998-01-01"}))
        assert request.events[0].behavior == behavior and request.events[0].amount == 12.5
        assert EventsRequest.model_validate({"events": [event]}).events[0].amount == 12.5
    returned = [_event(), _event(behavior=RETURN, amount=4.0)]
    assert validate_events(returned, ("buy", RETURN), 10, 10) == {"u1"}
    assert events_table([returned]).column("amount").to_pylist() == [0.0, 4.0]
    with pytest.raises(RequestError) as no_returns:
        validate_events(returned, BEHAVIORS, 10, 10)
    assert no_returns.value.loc == ["events", 1, "behavior"] and "'return'" in no_returns.value.problem


def test_predict_request_refuses_unknown_keys_and_as_of_out_of_range() -> None:
    assert PredictRequest.model_validate({"user_ids": ["u1"], "as_of": "1998-01-01"}).as_of.tzinfo is not None
    for body, loc in [({"user_ids": ["u1"], "asof": "1998-01-01"}, ("asof",)),
                      ({"user_ids": ["u1"], "as_of": "9999-12-31T00:00:00Z"}, ("as_of",)),
                      ({"user_ids": ["u1"], "as_of": "1500-01-01"}, ("as_of",))]:
        with pytest.raises(ValidationError) as caught:
            PredictRequest.model_validate_json(json.dumps(body))
        assert caught.value.errors()[0]["loc"] == loc
    # The limits hold with room inside pandas' nanosecond range, which the features and the log use.
    nanoseconds = (pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC"))
    assert nanoseconds[0] < pd.Timestamp(limits.TS_MIN) and pd.Timestamp(limits.AS_OF_MAX) < nanoseconds[1]


def test_limits_name_every_identifier_problem() -> None:
    assert limits.id_problem("user-42") is None
    assert "control character" in limits.id_problem("a\x1fb")
    assert "control character" in limits.id_problem("a\n")  # a trailing newline too (fullmatch, not match)
    assert f"expected {limits.ID_MIN_LENGTH} to" in limits.id_problem("")


def test_api_key_scheme_is_case_insensitive_and_required() -> None:
    assert offered_key({"authorization": "Bearer k"}) == "k"
    assert offered_key({"authorization": "bearer k"}) == "k"
    assert offered_key({"authorization": "BEARER  k "}) == "k"
    assert offered_key({"authorization": "k"}) is None  # no scheme: nothing offered
    assert offered_key({"authorization": "Basic k"}) is None
    assert offered_key({"x-api-key": "k"}) == "k"


def test_openapi_contract_documents_the_errors_really_sent() -> None:
    spec = {"paths": {"/predict": {"post": {"responses": {200: {"description": "ok"}, 400: {"description": "x"},
                                                          404: {"description": "never"}},
                                            "requestBody": {"content": {"application/json": {"schema": {
                                                "properties": {"as_of": {"type": "string", "default": None}}}}}}}}},
            "components": {"schemas": {}}}
    contract = openapi_contract(spec)
    responses = contract["paths"]["/predict"]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "413", "415", "422", "500"}
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    detail = contract["components"]["schemas"]["ErrorBody"]["properties"]["detail"]
    assert detail["type"] == "array"  # BentoML's own spec said a string
    body = contract["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["as_of"]["nullable"] is True


def test_client_errors_are_logged_as_one_info_line() -> None:
    import logging

    try:
        Event.model_validate({"user_id": "u", "ts": "1997-03-01", "behavior": "view", "amount": 999})
    except ValidationError as error:
        record = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "Exception on %s [%s]",
                                   ("/predict", "POST"), (type(error), error, error.__traceback__))
    assert ClientErrorLogFilter().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage().startswith("Exception on /predict [POST]: client error: 1 invalid field(s): amount")
    other = logging.LogRecord("bentoml", logging.ERROR, __file__, 1, "boom", (), (RuntimeError, RuntimeError("x"), None))
    assert ClientErrorLogFilter().filter(other) and other.levelno == logging.ERROR and other.exc_info


def test_non_finite_rows_never_reach_the_log() -> None:
    frame = pd.DataFrame({"user_id": ["a", "b", "c"], "p_buy": [0.1, 0.2, float("nan")],
                          "monetary_sum": [1.0, float("inf"), 2.0], "gap": [float("nan"), 1.0, 1.0]})
    assert finite_rows(frame)["user_id"].tolist() == ["a"]  # a missing feature (gap NaN) is kept


def test_events_table_is_the_canonical_table() -> None:
    events = [_event(), _event(user_id="u2", behavior="view", amount=0.0)]
    table = events_table([events])
    assert table.schema == EVENTS_SCHEMA and table.num_rows == 2
    assert table.column("user_id").to_pylist() == ["u1", "u2"]
    # Several requests in one table: each user id keyed by its request, so they stay apart.
    keyed = events_table([events, [_event()]], keys=["0", "1"])
    assert keyed.schema == EVENTS_SCHEMA
    assert keyed.column("user_id").to_pylist() == ["0\x1fu1", "0\x1fu2", "1\x1fu1"]


def test_validate_events_refuses_what_the_model_cannot_score() -> None:
    assert validate_events([_event(), _event(user_id="u2")], BEHAVIORS, 10, 10) == {"u1", "u2"}
    # The request model knows the whole vocabulary (an enum); a model trained on fewer behaviours refuses the rest.
    with pytest.raises(RequestError) as unknown:
        validate_events([_event(), _event(behavior="fav")], ("view", "buy"), 10, 10)
    assert unknown.value.status == 400 and unknown.value.loc == ["events", 1, "behavior"]
    assert "fav" in unknown.value.problem and "view" in unknown.value.problem
    with pytest.raises(RequestError) as too_many_events:
        validate_events([_event()] * 3, BEHAVIORS, max_events=2, max_users=10)
    assert too_many_events.value.status == 413 and "at most 2" in too_many_events.value.problem
    with pytest.raises(RequestError) as too_many_users:
        validate_events([_event(user_id=f"u{i}") for i in range(3)], BEHAVIORS, max_events=10, max_users=2)
    assert too_many_users.value.status == 413 and "3 users" in too_many_users.value.problem
    with pytest.raises(RequestError) as busy_user:
        validate_events([_event()] * (limits.MAX_EVENTS_PER_USER + 1), BEHAVIORS, max_events=10**6, max_users=10)
    assert busy_user.value.status == 413 and "per user" in busy_user.value.problem
    with pytest.raises(RequestError) as empty:
        validate_events([], BEHAVIORS, 10, 10)
    assert empty.value.loc == ["events"]
    body = unknown.value.body()
    assert body["detail"] == [{"loc": ["events", 1, "behavior"], "msg": unknown.value.problem}]


def _records(n: int, day: str, start: int = 0) -> pd.DataFrame:
    times = pd.date_range(f"{day}T00:00:00Z", periods=n, freq="1min")
    return pd.DataFrame({"request_time": times, "request_id": "r", "model_version": "3",
                         "user_id": [f"u{start + i}" for i in range(n)], "p_buy": 0.5, "expected_value": 1.0})


def test_prediction_log_writes_everything_on_close_and_rotates_by_day_and_size(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "log", flush_records=40, flush_seconds=3600)  # only size or close flush
    log.append(_records(30, "2026-01-01"))
    log.append(_records(30, "2026-01-02", start=30))
    log.close()
    assert log.written == 60
    files = sorted((tmp_path / "log").glob("date=*/part-*.parquet"))
    assert {f.parent.name for f in files} == {"date=2026-01-01", "date=2026-01-02"}
    assert all(len(pd.read_parquet(f)) <= 40 for f in files)
    back = read_prediction_log(tmp_path / "log")
    assert sorted(back["user_id"]) == sorted(f"u{i}" for i in range(60))
    since = read_prediction_log(tmp_path / "log", since=dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    assert len(since) == 30 and since["user_id"].iloc[0] == "u30"
    assert not list((tmp_path / "log").rglob(".*.tmp"))  # no half-written files left behind
    with pytest.raises(RuntimeError):
        log.append(_records(1, "2026-01-03"))


def test_prediction_log_flushes_by_time_and_loses_nothing_under_concurrent_appends(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "log", flush_records=10_000, flush_seconds=0.05)
    threads = [threading.Thread(target=lambda k=k: [log.append(_records(5, "2026-02-01", start=k * 500 + j * 5))
                                                    for j in range(100)]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = dt.datetime.now() + dt.timedelta(seconds=10)
    while log.written < 2000 and dt.datetime.now() < deadline:  # the timer, not close(), writes these
        threading.Event().wait(0.05)
    assert log.written == 2000
    log.close()
    back = read_prediction_log(tmp_path / "log")
    assert len(back) == 2000 and back["user_id"].is_unique


def test_empty_log_reads_as_an_empty_frame(tmp_path: Path) -> None:
    assert read_prediction_log(tmp_path / "nothing").empty


def test_serve_settings_come_from_params_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text(
        "split: {eval_cutoff: '1997-10-01', horizon_days: 30, train_cutoffs: ['1997-07-01']}\n"
        "serve: {max_users: 7, log_dir: logs/predictions}\n"
    )
    for name in ("USERVALUE_PARAMS", "USERVALUE_MAX_USERS", "USERVALUE_BATCH_WAIT_MS", "USERVALUE_LOG_DIR",
                 "USERVALUE_PREDICTION_LOG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USERVALUE_PROJECT_DIR", str(tmp_path))
    settings = serve_settings()
    assert settings.max_users == 7 and settings.log_dir == tmp_path / "logs/predictions"
    assert settings.batch_wait_ms == 5.0 and settings.max_events == 100_000  # the section's defaults
    monkeypatch.setenv("USERVALUE_MAX_USERS", "3")
    monkeypatch.setenv("USERVALUE_PREDICTION_LOG_DIR", str(tmp_path / "elsewhere"))
    settings = serve_settings()
    assert settings.max_users == 3 and settings.log_dir == tmp_path / "elsewhere"
    monkeypatch.delenv("USERVALUE_PREDICTION_LOG_DIR")
    monkeypatch.setenv("USERVALUE_LOG_DIR", "relative/log")  # USERVALUE_<FIELD>, relative to the project
    assert serve_settings().log_dir == tmp_path / "relative/log"
    monkeypatch.setenv("USERVALUE_MAX_USERS", "")  # empty: not set
    assert serve_settings().max_users == 7
    monkeypatch.setenv("USERVALUE_MAX_USERS", "many")
    with pytest.raises(ConfigError, match="USERVALUE_MAX_USERS") as bad:
        serve_settings()
    assert str(tmp_path / "params.yaml") in str(bad.value) and "section serve" in str(bad.value)
    monkeypatch.delenv("USERVALUE_MAX_USERS")
    monkeypatch.setenv("USERVALUE_BATCH_WAIT_MS", "0")
    assert serve_settings().batch_wait_ms == 0.0
    monkeypatch.setenv("USERVALUE_BATCH_WAIT_MS", "-1")
    with pytest.raises(ConfigError, match="batch_wait_ms"):
        serve_settings()
    # Another params file, and none at all (ServeParams' defaults).
    (tmp_path / "other.yaml").write_text((tmp_path / "params.yaml").read_text().replace("max_users: 7", "max_users: 9"))
    monkeypatch.delenv("USERVALUE_BATCH_WAIT_MS")
    monkeypatch.setenv("USERVALUE_PARAMS", str(tmp_path / "other.yaml"))
    assert serve_settings().max_users == 9
    monkeypatch.setenv("USERVALUE_PARAMS", str(tmp_path / "missing.yaml"))
    assert serve_settings().max_users == 1000

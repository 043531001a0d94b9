"""The packaged champion served by a real `bentoml serve`, called over HTTP; the monitor on its log.

One small synthetic project runs the whole DVC pipeline (…, register, package, monitor), then
`uservalue serve` (what `make serve` runs) starts the built Bento on a free port (slow).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from tests.e2e.conftest import copy_project, run_in, set_param
from tests.support.serving import EVAL_CUTOFF, Server, eval_users, events_of
from uservalue.serving.prediction_log import read_prediction_log

pytestmark = pytest.mark.slow

MAX_USERS = 60


@pytest.fixture(scope="module")
def project(served_project_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The session's built project (tests/conftest.py), copied: the reliability suite serves another copy.
    return copy_project(served_project_template, tmp_path_factory.mktemp("served-project") / "project")


@pytest.fixture(scope="module")
def server(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Flush only on shutdown (huge thresholds), so the test proves nothing is lost when stopping.
    running = Server(project, tmp_path_factory.mktemp("served") / "prediction_log",
                     USERVALUE_LOG_FLUSH_RECORDS="1000000", USERVALUE_LOG_FLUSH_SECONDS="3600")
    yield running
    if running.process.poll() is None:
        running.stop()


SERVED: dict[str, list[dict]] = {"rows": []}  # every prediction returned, to check the log against


def _predict(server: Server, body: dict) -> httpx.Response:
    response = server.post("/predict", body)
    if response.status_code == 200:
        SERVED["rows"] += response.json()["predictions"]
    return response


def test_health_probes_and_metadata(server: Server, project: Path) -> None:
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert httpx.get(f"{server.url}/livez").status_code == 200
    meta = server.post("/metadata", {}).json()
    registry = json.loads((project / "reports/registry.json").read_text())
    package = json.loads((project / "reports/package.json").read_text())
    assert meta["model_name"] == "user-value" and meta["model_version"] == registry["champion_version"]
    assert meta["bento_model"] == package["bento_model"] and meta["model_type"] == "linear"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    features_md5 = next(o["md5"] for o in lock["stages"]["featurize"]["outs"] if o["path"] == "data/features")
    assert meta["training_data"]["data/features"] == features_md5
    assert set(meta["metrics"]) >= {"gini", "auc", "rmse"} and meta["horizon_days"] == 120


def test_one_user(server: Server, project: Path) -> None:
    user = eval_users(project, 1)[0]
    response = _predict(server, {"events": events_of(project, [user]), "as_of": EVAL_CUTOFF})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["as_of"] == EVAL_CUTOFF and len(body["predictions"]) == 1
    row = body["predictions"][0]
    assert row["user_id"] == user and 0 <= row["p_buy"] <= 1 and row["expected_value"] >= 0
    assert row["horizon_days"] == 120 and row["model_version"] == body["model"]["version"]
    assert set(row["influence"]) == {"view", "fav", "cart", "buy"}
    assert abs(sum(row["influence"].values()) - 1) < 1e-6


def test_served_predictions_equal_the_pipeline_batch(server: Server, project: Path) -> None:
    users = eval_users(project, 40)
    response = _predict(server, {"events": events_of(project, users), "as_of": EVAL_CUTOFF})
    assert response.status_code == 200, response.text
    served = pd.DataFrame(response.json()["predictions"]).set_index("user_id").sort_index()
    assert list(served.index) == sorted(users)
    # The evaluate stage's predictions of the same model for the same users at the same cutoff.
    champion = json.loads((project / "reports/metrics.json").read_text())["champion"]
    batch = pd.read_parquet(project / "data/predictions/eval.parquet")
    batch = batch[(batch["model"] == champion) & batch["user_id"].isin(users)].set_index("user_id").sort_index()
    pd.testing.assert_series_equal(served["p_buy"], batch["p_buy"].astype(float), rtol=1e-6, check_names=False)
    pd.testing.assert_series_equal(served["expected_value"], batch["expected_value"].astype(float), rtol=1e-6,
                                   check_names=False)


def _batch_metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    values = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for key in values:
            if line.startswith(f"uservalue_batch_requests_{key} "):
                values[key] = float(line.split()[1])
    return values


def test_concurrent_requests_are_each_answered_as_if_alone(server: Server, project: Path) -> None:
    """Concurrent requests are scored in batches (one feature query, one forward pass): each must
    still get its own users' predictions, also when two requests name the same user id with
    different events."""
    users = eval_users(project, 12, offset=5)
    bodies = [{"events": events_of(project, [user]), "as_of": EVAL_CUTOFF} for user in users]
    full = events_of(project, [users[0]])
    bodies.append({"events": full[: max(1, len(full) // 2)], "as_of": EVAL_CUTOFF})  # users[0] again, less history
    before = _batch_metrics(server)
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        responses = list(pool.map(lambda body: server.post("/predict", body), bodies))
    after = _batch_metrics(server)
    # /metrics (Prometheus) counts every request once, in however many batches they were scored.
    assert after["sum"] - before["sum"] == len(bodies)
    assert 1 <= after["count"] - before["count"] <= len(bodies)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for response in responses:
        SERVED["rows"] += response.json()["predictions"]
    answered = [r.json()["predictions"] for r in responses]
    assert [rows[0]["user_id"] for rows in answered] == [*users, users[0]] and all(len(a) == 1 for a in answered)
    champion = json.loads((project / "reports/metrics.json").read_text())["champion"]
    batch = pd.read_parquet(project / "data/predictions/eval.parquet")
    batch = batch[batch["model"] == champion].set_index("user_id")
    for rows in answered[:-1]:
        expected = batch.loc[rows[0]["user_id"]]
        assert rows[0]["p_buy"] == pytest.approx(float(expected["p_buy"]), rel=1e-6)
        assert rows[0]["expected_value"] == pytest.approx(float(expected["expected_value"]), rel=1e-6)
    if len(full) > 1:  # with half the history, the same user id is a different user
        assert answered[-1][0]["expected_value"] != pytest.approx(answered[0][0]["expected_value"], rel=1e-6)


BAD_REQUESTS = {
    "unknown behaviour": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "click"}]},
                          400, ["events", 0, "behavior"]),
    "negative amount": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "buy", "amount": -3}]},
                        400, ["events", 0, "amount"]),
    "bad timestamp": ({"events": [{"user_id": "a", "ts": "not a time", "behavior": "buy"}]},
                      400, ["events", 0, "ts"]),
    "missing field": ({"events": [{"user_id": "a", "behavior": "buy"}]}, 400, ["events", 0, "ts"]),
    "empty list": ({"events": []}, 400, ["events"]),
    "no events at all": ({"as_of": EVAL_CUTOFF}, 400, ["events"]),
    "bad as_of": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "buy"}], "as_of": "soon"},
                  400, ["as_of"]),
    "no history before as_of": ({"events": [{"user_id": "a", "ts": "1999-03-01", "behavior": "buy"}],
                                 "as_of": EVAL_CUTOFF}, 422, ["events", 0, "ts"]),
    "too many users": ({"events": [{"user_id": f"u{i}", "ts": "1997-03-01", "behavior": "view"}
                                   for i in range(MAX_USERS + 1)]}, 413, ["events"]),
    "too many ids": ({"user_ids": [f"u{i}" for i in range(MAX_USERS + 1)]}, 413, ["user_ids"]),
    "empty id": ({"user_ids": [""]}, 400, ["user_ids", 0]),
    # The limits shared with the validation gate (uservalue.limits; issue 19).
    "as_of past pandas' range": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "buy"}],
                                  "as_of": "9999-12-31T00:00:00Z"}, 400, ["as_of"]),
    "ts before pandas' range": ({"events": [{"user_id": "u", "ts": "1400-01-01", "behavior": "buy", "amount": 3}],
                                 "as_of": "1500-01-01"}, 400, ["events", 0, "ts"]),
    "ts in year 1": ({"events": [{"user_id": "a", "ts": "0001-01-01T00:00:00Z", "behavior": "buy"}]},
                     400, ["events", 0, "ts"]),
    "ts in the future": ({"events": [{"user_id": "a", "ts": "2999-01-01T00:00:00Z", "behavior": "buy"}]},
                         400, ["events", 0, "ts"]),
    "ts as a number": ({"events": [{"user_id": "a", "ts": 0, "behavior": "buy"}]}, 400, ["events", 0, "ts"]),
    "absurd amount": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "buy", "amount": 1.7e308}]},
                      400, ["events", 0, "amount"]),
    "amount of a view": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "view", "amount": 999}]},
                         400, ["events", 0, "amount"]),
    "amount as a string": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "buy", "amount": "3"}]},
                           400, ["events", 0, "amount"]),
    "NUL in an id": ({"events": [{"user_id": "a\x00b", "ts": "1997-03-01", "behavior": "buy"}]},
                     400, ["events", 0, "user_id"]),
    "batch separator in an id": ({"user_ids": ["a\x1fb"]}, 400, ["user_ids", 0]),
    "unknown top-level key": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "buy"}], "asof": "x"},
                              400, ["asof"]),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_is_a_4xx_naming_the_field(server: Server, case: str) -> None:
    body, status, loc = BAD_REQUESTS[case]
    response = server.post("/predict", body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert any(item["loc"] == loc for item in detail), detail
    assert all(item["msg"] for item in detail)


def test_malformed_json_is_a_400_and_the_service_keeps_serving(server: Server, project: Path) -> None:
    response = httpx.post(f"{server.url}/predict", content=b'{"events": [1, 2', timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.text
    user = eval_users(project, 1, offset=3)[0]
    assert _predict(server, {"events": events_of(project, [user]), "as_of": EVAL_CUTOFF}).status_code == 200


def test_by_id_equals_the_batch_score_command(server: Server, project: Path, tmp_path: Path) -> None:
    """Users asked by id are scored from the online store the materialize stage wrote: the same numbers
    as `uservalue score` (DuckDB's batch SQL) for the same users at the same as_of; an unknown id is
    named under `errors` and the rest of the request is answered."""
    users = eval_users(project, 25, offset=3)
    as_of = "1998-04-01T00:00:00+00:00"
    response = _predict(server, {"user_ids": [*users, "no-such-user"], "as_of": as_of})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["errors"] == [{"user_id": "no-such-user", "loc": ["user_ids", len(users)],
                               "msg": "unknown user: no events stored for this id and none sent"}]
    served = pd.DataFrame(body["predictions"]).set_index("user_id").sort_index()
    assert list(served.index) == sorted(users)
    run_in(project, "uservalue", "score", "--as-of", as_of, "--out", str(tmp_path / "batch.parquet"))
    batch = pd.read_parquet(tmp_path / "batch.parquet").set_index("user_id").loc[sorted(users)]
    for column in ("p_buy", "expected_value"):
        pd.testing.assert_series_equal(served[column], batch[column].astype(float), rtol=1e-6, check_names=False)
    events = pd.read_parquet(project / "data/validated.parquet")
    latest = events[events["user_id"].isin(users) & (events["ts"] < pd.Timestamp(as_of))].groupby("user_id")["ts"].max()
    assert (pd.to_datetime(served["features_as_of"]) - latest.sort_index()).abs().max() < pd.Timedelta(seconds=1)


def test_events_update_the_store_once_per_event_id(server: Server, project: Path) -> None:
    new = [{"event_id": "e1", "user_id": "new-user", "ts": "1998-03-01T10:00:00Z", "behavior": "view", "item_id": 7},
           {"event_id": "e2", "user_id": "new-user", "ts": "1998-03-02T10:00:00Z", "behavior": "buy", "amount": 9.5}]
    first = server.post("/events", {"events": new})
    assert first.status_code == 200 and first.json() == {"accepted": 2, "new": 2, "duplicates": 0}, first.text
    again = server.post("/events", {"events": new[1:]})  # a retry of the purchase: counted once
    assert again.json() == {"accepted": 1, "new": 0, "duplicates": 1}
    bad = server.post("/events", {"events": [{**new[0], "behavior": "teleport"}]})
    assert bad.status_code == 400 and bad.json()["detail"][0]["loc"] == ["events", 0, "behavior"]
    response = _predict(server, {"user_ids": ["new-user"], "as_of": "1998-04-01T00:00:00Z"})
    assert response.status_code == 200, response.text
    [row] = response.json()["predictions"]
    assert row["user_id"] == "new-user" and row["features_as_of"].startswith("1998-03-02T10:00:00")
    logged = pd.read_parquet(project / "data/validated.parquet")
    assert "new-user" not in set(logged["user_id"])  # the store changed, the pipeline's data did not


def test_explain_effect_over_http(server: Server, project: Path) -> None:
    """"explain": "effect" adds, per user, the change one more event of each behaviour at as_of makes:
    the trained champion's own numbers (models.influence.user_effects on the user's row), null for a
    behaviour it never saw in training; without it no effect is returned; a bad value is a 400
    naming the field."""
    import pyarrow as pa

    from uservalue.features.online import event_columns, online_arrays
    from uservalue.models import influence
    from uservalue.models.catalog import load_model
    from uservalue.schema import EVENTS_SCHEMA

    users = eval_users(project, 3, offset=4)
    body = {"events": events_of(project, users), "as_of": EVAL_CUTOFF}
    response = _predict(server, {**body, "explain": "effect"})
    assert response.status_code == 200, response.text
    answers = {row["user_id"]: row for row in response.json()["predictions"]}
    assert sorted(answers) == sorted(users)
    champion = json.loads((project / "reports/metrics.json").read_text())["champion"]
    model = load_model(project / "models" / champion / "model")
    seen = json.loads((project / "models" / champion / "influence.json").read_text())["seen"]
    events = pd.read_parquet(project / "data/validated.parquet")
    events = events[events["user_id"].isin(users) & (events["ts"] < pd.Timestamp(EVAL_CUTOFF))]
    rows = online_arrays(event_columns(pa.Table.from_pandas(events, schema=EVENTS_SCHEMA, preserve_index=False)),
                         pd.Timestamp(EVAL_CUTOFF).to_pydatetime(), model.spec)
    offline = dict(zip(rows.user_id.tolist(), influence.user_effects(model, rows), strict=True))
    for user, row in answers.items():
        assert set(row["effect"]) == {"view", "fav", "cart"}  # every behaviour but the purchase
        for behavior, effect in row["effect"].items():
            if not seen[behavior]:
                assert effect is None, (behavior, effect)
                continue
            assert set(effect) == {"expected_value", "p_buy"}
            assert effect["expected_value"] == pytest.approx(offline[user][behavior]["expected_value"], rel=1e-6,
                                                             abs=1e-9)
            assert effect["p_buy"] == pytest.approx(offline[user][behavior]["p_buy"], rel=1e-6, abs=1e-12)
    # The synthetic log has every behaviour: each is seen, and some user's effects are not all zero.
    assert all(seen[b] for b in ("view", "fav", "cart"))
    assert any(e["expected_value"] != 0 for row in answers.values() for e in row["effect"].values())
    plain = _predict(server, body)
    assert plain.status_code == 200 and all("effect" not in row for row in plain.json()["predictions"])
    bad = server.post("/predict", {**body, "explain": "shapley"})
    assert bad.status_code == 400, bad.text
    assert any(item["loc"] == ["explain"] and "effect" in item["msg"] for item in bad.json()["detail"]), bad.json()


def _recommend_offline(project: Path, user: str, as_of: str, k: int) -> list[str]:
    """The train_recs stage's champion, loaded from its saved directory, on the user's validated events."""
    from uservalue.recs.base import load_recommender

    champion = json.loads((project / "reports/recs_metrics.json").read_text())["champion"]
    events = pd.read_parquet(project / "data/validated.parquet")
    history = events[(events["user_id"] == user) & (events["ts"] < pd.Timestamp(as_of))]
    return load_recommender(project / "models/recs" / champion).recommend(history, k)[0].items


def test_recommend_by_id_and_by_events_over_http(server: Server, project: Path) -> None:
    """POST /recommend answers from the packaged `user-recs` champion: by id (the online store) and by events,
    the offline model's items, best first, without what the user bought unless asked."""
    registry = json.loads((project / "reports/recs_registry.json").read_text())
    package = json.loads((project / "reports/package.json").read_text())
    assert package["recs_model"]["model_name"] == "user-recs"
    assert package["recs_model"]["model_version"] == registry["champion_version"]
    assert server.post("/metadata", {}).json()["recs_model"]["model_version"] == registry["champion_version"]
    events = pd.read_parquet(project / "data/validated.parquet")
    past = events[events["ts"] < pd.Timestamp(EVAL_CUTOFF)]
    user = min(set(past.loc[past["behavior"] == "buy", "user_id"]) & set(eval_users(project, 200)))
    bought = set(past.loc[(past["user_id"] == user) & (past["behavior"] == "buy"), "item_id"])

    by_id = server.post("/recommend", {"user_id": user, "k": 10, "as_of": EVAL_CUTOFF})
    assert by_id.status_code == 200, by_id.text
    body = by_id.json()
    assert body["model_version"] == registry["champion_version"] and body["user_id"] == user
    items = [row["item_id"] for row in body["items"]]
    scores = [row["score"] for row in body["items"]]
    assert len(items) == 10 == len(set(items)) and scores == sorted(scores, reverse=True)
    assert not set(items) & bought
    offline = _recommend_offline(project, user, EVAL_CUTOFF, 10)
    by_events = server.post("/recommend", {"events": events_of(project, [user]), "k": 10, "as_of": EVAL_CUTOFF})
    assert by_events.status_code == 200, by_events.text
    assert [row["item_id"] for row in by_events.json()["items"]] == offline
    # By id the events come from the store (the same events; equal timestamps may be ordered differently).
    assert len(set(items) & set(offline)) >= 8, (items, offline)

    with_bought = server.post("/recommend", {"user_id": user, "k": 50, "as_of": EVAL_CUTOFF, "exclude_bought": False})
    assert with_bought.status_code == 200 and len(with_bought.json()["items"]) == 50
    # A user with no history before as_of gets the most popular items.
    cold = server.post("/recommend", {"user_id": user, "k": 5, "as_of": "1990-01-01T00:00:00Z"})
    assert cold.status_code == 200 and len(cold.json()["items"]) == 5, cold.text


RECOMMEND_BAD_REQUESTS = {
    "unknown user": ({"user_id": "no-such-user"}, 404, ["user_id"]),
    "neither id nor events": ({"k": 5}, 400, ["user_id"]),
    "k zero": ({"user_id": "a", "k": 0}, 400, ["k"]),
    "k too large": ({"user_id": "a", "k": 1000}, 400, ["k"]),
    "k as a string": ({"user_id": "a", "k": "5"}, 400, ["k"]),
    "events of two users": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "view", "item_id": 1},
                                        {"user_id": "b", "ts": "1997-03-02", "behavior": "view", "item_id": 2}]},
                            400, ["events", 1, "user_id"]),
    "events of another user": ({"user_id": "a", "events": [{"user_id": "b", "ts": "1997-03-01", "behavior": "view"}]},
                               400, ["events", 0, "user_id"]),
    "unknown behaviour": ({"events": [{"user_id": "a", "ts": "1997-03-01", "behavior": "click"}]},
                          400, ["events", 0, "behavior"]),
    "bad as_of": ({"user_id": "a", "as_of": "soon"}, 400, ["as_of"]),
    "unknown key": ({"user_id": "a", "n": 5}, 400, ["n"]),
}


@pytest.mark.parametrize("case", sorted(RECOMMEND_BAD_REQUESTS))
def test_recommend_bad_input_is_a_4xx_naming_the_field(server: Server, case: str) -> None:
    body, status, loc = RECOMMEND_BAD_REQUESTS[case]
    response = server.post("/recommend", body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert any(item["loc"] == loc for item in detail), detail
    assert all(item["msg"] for item in detail)


def test_prediction_log_holds_what_was_served_after_shutdown(server: Server, project: Path) -> None:
    # Enough rows for the monitor's log window (monitor.min_rows = 100).
    for offset in range(1, 3):
        users = eval_users(project, MAX_USERS, offset=offset)
        assert _predict(server, {"events": events_of(project, users), "as_of": EVAL_CUTOFF}).status_code == 200
    assert not list(server.log_dir.glob("date=*/part-*.parquet"))  # thresholds not reached: all buffered
    assert server.stop() == 0
    logged = read_prediction_log(server.log_dir)
    served = pd.DataFrame(SERVED["rows"])
    assert len(logged) == len(served) > 100
    assert sorted(logged["user_id"]) == sorted(served["user_id"])
    merged = logged.merge(served, on=["user_id", "p_buy"], how="inner")
    assert len(merged) >= len(served)
    assert (logged["model_version"] == served["model_version"].iloc[0]).all()
    assert {"request_time", "as_of", "expected_value", "recency_days", "n_events"} <= set(logged.columns)
    # The events /events accepted are in the event log the next ingest reads (params data.event_log).
    event_log = pd.concat([pd.read_parquet(f) for f in (project / "data/event_log").glob("date=*/part-*.parquet")])
    assert sorted(event_log["event_id"]) == ["e1", "e2", "e2"] and set(event_log["user_id"]) == {"new-user"}


def test_monitor_on_the_prediction_log(server: Server, project: Path) -> None:
    assert server.process.poll() is not None  # the previous test stopped it and the log is on disk
    done = run_in(project, "uservalue", "monitor", "--current", "log", "--log-dir", str(server.log_dir),
                  "--out-dir", str(project / "monitor_log"))
    latest = json.loads((project / "monitor_log/latest.json").read_text())
    assert latest["current"]["source"] == "prediction_log" and latest["current"]["rows"] > 100
    assert latest["reference"]["rows"] == len(pd.read_parquet(project / "data/features/eval.parquet"))
    assert (project / "monitor_log" / latest["report"]).is_file()
    assert "drift_detected=" in done.stderr

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.get_run(latest["mlflow_run_id"])
    assert run.data.tags["stage"] == "monitor" and "drifted_share" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "monitoring")}
    assert f"monitoring/{latest['report']}" in artifacts and "monitoring/latest.json" in artifacts


@pytest.mark.parametrize(("drift", "flagged"), [(0.0, False), (1.0, True)])
def test_monitor_flags_a_drifted_batch_and_exits_3(project: Path, drift: float, flagged: bool) -> None:
    events = project / f"new_events_{drift}.parquet"
    run_in(project, "uservalue", "generate", "--out", str(events), "--truth-dir", str(project / f"truth_{drift}"),
           "--users", "3000", "--events-per-user", "60", "--seed", "11", "--drift", str(drift))
    original = set_param(project, "monitor", "as_of", "1998-01-01")  # the reference's cutoff: same calendar
    try:
        done = run_in(project, "uservalue", "monitor", "--events", str(events), "--out-dir",
                      str(project / f"monitor_{drift}"), "--fail-on-drift", check=False)
    finally:
        (project / "params.yaml").write_text(original)
    latest = json.loads((project / f"monitor_{drift}/latest.json").read_text())
    assert latest["drift_detected"] is flagged, latest["columns"]
    assert done.returncode == (3 if flagged else 0), done.stderr
    if flagged:
        html = (project / f"monitor_{drift}" / latest["report"]).read_text()
        assert latest["drifted_columns"] and all(column in html for column in latest["drifted_columns"])


def test_api_key_is_required_when_set(project: Path, tmp_path: Path) -> None:
    keyed = Server(project, tmp_path / "prediction_log", USERVALUE_API_KEY="s3cret-key")
    try:
        assert httpx.get(f"{keyed.url}/readyz").status_code == 200  # probes stay open
        refused = keyed.post("/metadata", {})
        assert refused.status_code == 401 and refused.json()["detail"][0]["loc"] == ["header", "Authorization"]
        assert keyed.post("/metadata", {}, Authorization="Bearer wrong").status_code == 401
        assert keyed.post("/metadata", {}, Authorization="Bearer s3cret-key").status_code == 200
        assert keyed.post("/metadata", {}, **{"X-API-Key": "s3cret-key"}).status_code == 200
        # The scheme is case-insensitive (RFC 7235) and required: a bare key is refused.
        assert keyed.post("/metadata", {}, Authorization="bearer s3cret-key").status_code == 200
        assert keyed.post("/metadata", {}, Authorization="s3cret-key").status_code == 401
        # Only the probes are open: /metrics tells the model's traffic.
        assert httpx.get(f"{keyed.url}/livez").status_code == 200
        assert httpx.get(f"{keyed.url}/metrics").status_code == 401
        assert httpx.get(f"{keyed.url}/metrics", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
    finally:
        keyed.stop()

"""The service's scorer gives what the pipeline gives: same features, same model, same numbers."""

from __future__ import annotations

import asyncio
import datetime as dt

import numpy as np
import pandas as pd
import pytest

from uservalue.models.base import FitContext, ModelInfo
from uservalue.models.catalog import create_model
from uservalue.serving.batching import BatchingPredictor
from uservalue.serving.prediction_log import PredictionLog, read_prediction_log
from uservalue.serving.requests import Event, RequestError
from uservalue.serving.scorer import Scorer, score_events, score_features, score_table

# Two models with different feature paths: aggregates only, and sequences.
SERVED = {"linear": {}, "sequence": {"max_epochs": 1}}


@pytest.fixture(scope="module", params=sorted(SERVED))
def served_model(request, synthetic_features, tmp_path_factory):
    name = request.param
    model = create_model(name, SERVED[name], synthetic_features.spec, synthetic_features.horizon_days)
    model.fit(synthetic_features.train,
              FitContext(seed=0, device="cpu", checkpoint_dir=tmp_path_factory.mktemp(name) / "ckpt"))
    return model


def _request_events(events: pd.DataFrame, users: list[str]) -> list[Event]:
    rows = events[events["user_id"].isin(users)]
    return [Event.model_validate({k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and np.isnan(v))})
            for row in rows.to_dict("records")]


def test_served_prediction_equals_the_pipeline_batch(served_model, synthetic_features, small_synthetic) -> None:
    events_path, _ = small_synthetic
    events = pd.read_parquet(events_path)
    cutoff = dt.datetime.fromisoformat(synthetic_features.meta["splits"]["eval"][0]["cutoff"])
    users = synthetic_features.eval["user_id"].iloc[::97].head(12).tolist()

    scorer = Scorer(served_model, ModelInfo(name="user-value", version="7"), max_events=100_000, max_users=100)
    as_of, served = scorer.score(_request_events(events, users), cutoff)
    assert as_of == cutoff and served["user_id"].tolist() == sorted(users)

    # The evaluation features the featurize stage wrote, scored as evaluate scores them.
    pipeline = score_features(served_model, synthetic_features.eval)
    pipeline = pipeline.set_index("user_id").loc[sorted(users)].reset_index()
    columns = ["p_buy", "expected_value", *(f"influence_{b}" for b in served_model.spec.behaviors)]
    np.testing.assert_allclose(served[columns].to_numpy(), pipeline[columns].to_numpy(), rtol=1e-6, atol=1e-9)
    # And the batch command's path (every user of the whole file) agrees too.
    batch = score_events(served_model, events_path, cutoff).set_index("user_id").loc[sorted(users)].reset_index()
    np.testing.assert_allclose(served[columns].to_numpy(), batch[columns].to_numpy(), rtol=1e-6, atol=1e-9)

    rows = scorer.response_rows(served, [as_of] * len(served))
    assert rows[0]["model_version"] == "7" and rows[0]["horizon_days"] == synthetic_features.horizon_days
    # features_as_of: the time of the user's latest event before as_of.
    first = events[(events["user_id"] == rows[0]["user_id"]) & (events["ts"] < pd.Timestamp(cutoff))]["ts"].max()
    assert abs(dt.datetime.fromisoformat(rows[0]["features_as_of"]) - first.to_pydatetime()) < dt.timedelta(seconds=1)
    assert set(rows[0]["influence"]) == set(served_model.spec.behaviors)
    assert abs(sum(rows[0]["influence"].values()) - 1) < 1e-6 or sum(rows[0]["influence"].values()) == 0
    request = scorer.prepare(_request_events(events, users), cutoff)
    logged = scorer.log_frame(scorer.score_batch([request]))
    assert {"request_time", "model_version", "user_id", "p_buy", "expected_value", "recency_days"} <= set(logged)
    assert logged["user_id"].tolist() == sorted(users) and set(logged["request_id"]) == {request.request_id}


def test_a_table_scored_in_small_batches_equals_one_frame(served_model, synthetic_features) -> None:
    """Issue 13: score_table (the monitor's and batch scoring's path) makes a DataFrame of batch_rows rows at a
    time; the same rows, order and numbers as score_features on the whole table."""
    import pyarrow as pa

    table = pa.Table.from_pandas(synthetic_features.eval.head(150), preserve_index=False)  # Shapley: 16 rows a row
    whole = score_features(served_model, table.to_pandas())
    pd.testing.assert_frame_equal(score_table(served_model, table), whole)  # the default: one batch here
    small = score_table(served_model, table, batch_rows=37)  # many batches, the last one short
    assert len(table) > 3 * 37 and small["user_id"].tolist() == whole["user_id"].tolist()
    predicted = ["p_buy", "expected_value", *(f"influence_{b}" for b in served_model.spec.behaviors)]
    # 37 is no multiple of PREDICT_CHUNK (the default is): float32 kernels then sum some rows in another
    # order, a difference in the 6th digit (measured: at most 2.2e-6 absolute, on 0.3% of the numbers).
    np.testing.assert_allclose(small[predicted].to_numpy(), whole[predicted].to_numpy(), rtol=1e-4, atol=1e-5)
    pd.testing.assert_frame_equal(small.drop(columns=predicted), whole.drop(columns=predicted))
    with pytest.raises(ValueError, match="batch_rows"):
        score_table(served_model, table, batch_rows=0)


def test_explain_effect_returns_each_users_per_event_effects(served_model, synthetic_features,
                                                              small_synthetic) -> None:
    """"explain": "effect": per user, the change one more event of each behaviour at as_of makes
    (models.influence.per_user_effects on the user's row); asked by one request of a batch, only its
    users get them, and the other numbers are unchanged."""
    from uservalue.features.online import online_arrays
    from uservalue.models import influence

    events = pd.read_parquet(small_synthetic[0])
    cutoff = dt.datetime.fromisoformat(synthetic_features.meta["splits"]["eval"][0]["cutoff"])
    users = synthetic_features.eval["user_id"].iloc[::131].head(3).tolist()
    scorer = Scorer(served_model, ModelInfo(name="user-value", version="7"), max_events=100_000, max_users=100)
    explained = scorer.prepare(_request_events(events, users[:2]), cutoff, explain="effect")
    plain = scorer.prepare(_request_events(events, users[2:]), cutoff)
    batch = scorer.score_batch([explained, plain])
    first, second = scorer.answers(batch)
    assert [r["user_id"] for r in first["predictions"]] == sorted(users[:2])
    assert all("effect" not in r for r in second["predictions"])
    alone = scorer.answers(scorer.score_batch([scorer.prepare(_request_events(events, users[:2]), cutoff)]))[0]
    for with_effect, without in zip(first["predictions"], alone["predictions"], strict=True):
        assert {k: v for k, v in with_effect.items() if k != "effect"} == without
    rows = online_arrays(_columns(events, users[:2]), cutoff, served_model.spec)
    d_value, d_p = influence.per_user_effects(served_model, rows)
    for k, answer in enumerate(first["predictions"]):
        assert set(answer["effect"]) == {"view", "fav", "cart"}  # every behaviour but the purchase
        for j, b in enumerate(("view", "fav", "cart")):
            assert answer["effect"][b]["expected_value"] == pytest.approx(d_value[k, j], rel=1e-6, abs=1e-9)
            assert answer["effect"][b]["p_buy"] == pytest.approx(d_p[k, j], rel=1e-6, abs=1e-12)
    with pytest.raises(RequestError, match="explain"):
        scorer.prepare(_request_events(events, users[:1]), cutoff, explain="shapley")


def _columns(events: pd.DataFrame, users: list[str]):
    import pyarrow as pa

    from uservalue.features.online import event_columns
    from uservalue.schema import EVENTS_SCHEMA

    rows = events[events["user_id"].isin(users)]
    return event_columns(pa.Table.from_pandas(rows, schema=EVENTS_SCHEMA, preserve_index=False))


def test_a_user_without_history_before_as_of_is_a_client_error(served_model) -> None:
    scorer = Scorer(served_model, ModelInfo(name="user-value", version="1"), max_events=10, max_users=10)
    late = Event(user_id="late", ts=dt.datetime(2020, 1, 1, tzinfo=dt.UTC), behavior="buy", amount=3.0)
    early = Event(user_id="early", ts=dt.datetime(1997, 1, 1, tzinfo=dt.UTC), behavior="view")
    with pytest.raises(RequestError) as caught:
        scorer.score([early, late], dt.datetime(1998, 1, 1, tzinfo=dt.UTC))
    assert caught.value.status == 422 and caught.value.loc == ["events", 1, "ts"] and "'late'" in caught.value.problem


def _history(user: str, shift_days: int, behavior: str = "buy") -> list[Event]:
    first = dt.datetime(1997, 3, 1, tzinfo=dt.UTC) + dt.timedelta(days=shift_days)
    # Only a purchase carries an amount (requests.Event refuses one on any other behaviour).
    return [Event(user_id=user, ts=first, behavior=behavior, amount=10.0 + shift_days if behavior == "buy" else 0.0),
            Event(user_id=user, ts=first + dt.timedelta(days=40), behavior="buy", amount=25.0)]


def test_concurrent_requests_are_batched_and_each_gets_what_it_gets_alone(served_model, tmp_path) -> None:
    """The service's batching: one query and one forward pass for requests that queue together,
    each answered exactly as if alone, even when two requests name the same user id with different
    events or ask about different times; a failing request fails alone."""
    scorer = Scorer(served_model, ModelInfo(name="user-value", version="2"), max_events=1000, max_users=50)
    behaviors = served_model.spec.behaviors
    as_of = dt.datetime(1997, 10, 1, tzinfo=dt.UTC)
    bodies = [(_history("same", 3 * i, behaviors[i % len(behaviors)]) + _history(f"own-{i}", i), as_of)
              for i in range(6)]
    bodies.append((_history("same", 1), dt.datetime(1998, 2, 1, tzinfo=dt.UTC)))  # another as_of
    late = [Event(user_id="late", ts=dt.datetime(2020, 1, 1, tzinfo=dt.UTC), behavior="buy", amount=1.0)]
    log = PredictionLog(tmp_path / "log", flush_records=10_000, flush_seconds=3600)
    predictor = BatchingPredictor(scorer, log)

    async def together() -> list:
        return await asyncio.gather(*(predictor.predict(events, when) for events, when in bodies),
                                    predictor.predict(late, as_of), return_exceptions=True)

    *answers, failed = asyncio.run(together())
    assert predictor.largest_batch > 1  # the first call starts a batch; the others queue behind it
    assert isinstance(failed, RequestError) and failed.status == 422 and "'late'" in failed.problem
    for (events, when), answer in zip(bodies, answers, strict=True):
        alone_as_of, alone = scorer.score(events, when)
        assert answer["as_of"] == alone_as_of.isoformat()
        assert [p["user_id"] for p in answer["predictions"]] == alone["user_id"].tolist()
        for served, expected in zip(answer["predictions"], alone.to_dict("records"), strict=True):
            assert served["p_buy"] == pytest.approx(expected["p_buy"], rel=1e-5, abs=1e-9)
            assert served["expected_value"] == pytest.approx(expected["expected_value"], rel=1e-5, abs=1e-9)
            for b in behaviors:
                assert served["influence"][b] == pytest.approx(expected[f"influence_{b}"], rel=1e-5, abs=1e-6)
    # The same user id in different requests, with different events, gets different answers.
    same = {a["predictions"][-1]["expected_value"] for a in answers[:6]}
    assert len(same) > 1
    # A request without as_of is scored at the time of its batch.
    now_answer = asyncio.run(predictor.predict(_history("now", 0), None))
    assert abs(dt.datetime.fromisoformat(now_answer["as_of"]) - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)

    predictor.close()
    logged = read_prediction_log(tmp_path / "log")
    # Every answered user once per request, under its request's id; nothing of the failed one.
    assert len(logged) == sum(len(a["predictions"]) for a in answers) + 1
    assert logged["request_id"].nunique() == len(answers) + 1 and "late" not in set(logged["user_id"])


def test_a_lone_small_request_is_scored_on_the_event_loop_and_a_large_one_on_the_scoring_thread(
        served_model, tmp_path) -> None:
    """BatchingPredictor's inline path (issue 15): nothing queued behind a small request, so it is scored
    on the loop's own thread, without the hand-off; a request with more users than INLINE_MAX_USERS goes to
    the scoring thread. Both answer what the scorer answers alone."""
    import threading

    from uservalue.serving import batching

    scorer = Scorer(served_model, ModelInfo(name="user-value", version="2"), max_events=1000, max_users=50)
    threads: list[str] = []
    score_batch = scorer.score_batch

    def recording(requests):  # the real scorer; only which thread called it is noted
        threads.append(threading.current_thread().name)
        return score_batch(requests)

    scorer.score_batch = recording  # type: ignore[method-assign]
    predictor = BatchingPredictor(scorer, PredictionLog(tmp_path / "log"))
    as_of = dt.datetime(1997, 10, 1, tzinfo=dt.UTC)
    small = _history("lone", 3)
    large = [e for i in range(batching.INLINE_MAX_USERS + 1) for e in _history(f"many-{i}", i)]

    async def lone(events: list[Event]) -> tuple[dict, str]:
        return await predictor.predict(events, as_of), threading.current_thread().name

    for events, inline in ((small, True), (large, False)):
        answer, loop_thread = asyncio.run(lone(events))
        assert (threads[-1] == loop_thread) is inline
        assert inline or threads[-1].startswith("uservalue-scorer")
        _, expected = scorer.score(events, as_of)
        assert [p["user_id"] for p in answer["predictions"]] == expected["user_id"].tolist()
        assert [p["expected_value"] for p in answer["predictions"]] == \
            pytest.approx(expected["expected_value"].tolist(), rel=1e-6)
    predictor.close()


@pytest.fixture(scope="module")
def stored(small_synthetic, tmp_path_factory):
    """A real SQLite online store materialized from the synthetic log."""
    from uservalue.features.online import event_columns
    from uservalue.serving.store import open_store

    events_path, _ = small_synthetic
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.sqlite'}")
    store.replace_all([event_columns(pd.read_parquet(events_path))])
    yield store
    store.close()


def test_scoring_by_id_equals_the_batch_score(served_model, synthetic_features, small_synthetic, stored) -> None:
    events_path, _ = small_synthetic
    cutoff = dt.datetime.fromisoformat(synthetic_features.meta["splits"]["eval"][0]["cutoff"])
    users = synthetic_features.eval["user_id"].iloc[::131].head(9).tolist()
    scorer = Scorer(served_model, ModelInfo(name="user-value", version="3"), max_events=1000, max_users=50,
                    store=stored)
    batch = scorer.score_batch([scorer.prepare([], cutoff, user_ids=[*users, "nobody"])])
    [answer] = scorer.answers(batch)
    assert [p["user_id"] for p in answer["predictions"]] == sorted(users)
    assert answer["errors"] == [{"user_id": "nobody", "loc": ["user_ids", len(users)],
                                 "msg": "unknown user: no events stored for this id and none sent"}]
    expected = score_events(served_model, events_path, cutoff).set_index("user_id").loc[sorted(users)]
    got = pd.DataFrame(answer["predictions"]).set_index("user_id")
    np.testing.assert_allclose(got[["p_buy", "expected_value"]].to_numpy(),
                               expected[["p_buy", "expected_value"]].to_numpy(), rtol=1e-6, atol=1e-9)


def test_events_sent_with_an_id_count_for_that_request_only(served_model, synthetic_features, stored) -> None:
    cutoff = dt.datetime.fromisoformat(synthetic_features.meta["splits"]["eval"][0]["cutoff"])
    user = synthetic_features.eval["user_id"].iloc[0]
    scorer = Scorer(served_model, ModelInfo(name="user-value", version="3"), max_events=1000, max_users=50,
                    store=stored)
    extra = [Event(user_id=user, ts=cutoff - dt.timedelta(hours=1), behavior="buy", amount=500.0)]
    plain, with_extra, again = (scorer.score_batch([r])
                                for r in (scorer.prepare([], cutoff, user_ids=[user]),
                                          scorer.prepare(extra, cutoff, user_ids=[user]),
                                          scorer.prepare([], cutoff, user_ids=[user])))
    assert with_extra.scored["monetary_sum"].iloc[0] == plain.scored["monetary_sum"].iloc[0] + 500.0
    assert with_extra.scored["recency_days"].iloc[0] == pytest.approx(1 / 24)
    pd.testing.assert_frame_equal(again.scored, plain.scored)  # the store was not changed


def test_log_rows_have_the_batch_paths_columns_and_types(served_model, synthetic_features, stored) -> None:
    """The scorer builds the prediction log from arrays: the same columns, dtypes and numbers as
    score_features on the same features (what the log held when the service scored DataFrames)."""
    from uservalue.features.online import online_features

    cutoff = dt.datetime.fromisoformat(synthetic_features.meta["splits"]["eval"][0]["cutoff"])
    users = synthetic_features.eval["user_id"].iloc[::211].head(5).tolist()
    scorer = Scorer(served_model, ModelInfo(name="user-value", version="4"), max_events=1000, max_users=50,
                    store=stored)
    request = scorer.prepare([], cutoff, user_ids=users)
    batch = scorer.score_batch([request])
    logged = scorer.log_frame(batch)

    stored_events, _ = stored.get(users)
    expected = score_features(served_model, online_features(stored_events, cutoff, served_model.spec).to_pandas())
    assert list(logged.columns) == ["request_time", "request_id", "as_of", "model_name", "model_version",
                                    *expected.columns, "horizon_days"]
    pd.testing.assert_frame_equal(logged[list(expected.columns)], expected, check_exact=False, rtol=1e-6, atol=1e-9)
    pd.testing.assert_frame_equal(batch.scored, expected, check_exact=False, rtol=1e-6, atol=1e-9)
    assert str(logged["request_time"].dtype) == str(logged["as_of"].dtype) == "datetime64[ns, UTC]"
    assert (logged["as_of"] == pd.Timestamp(cutoff)).all() and (logged["request_id"] == request.request_id).all()
    assert (logged["request_time"] == pd.Timestamp(request.received)).all()
    assert logged["horizon_days"].dtype == np.int64 and len(batch) == len(users)

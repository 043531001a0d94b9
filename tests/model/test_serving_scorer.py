"""The service's scorer gives what the pipeline gives: same features, same model, same numbers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from uservalue.models import create_model
from uservalue.models.base import FitContext
from uservalue.serving import Event, ModelInfo, RequestError, Scorer, score_events, score_features

# Two models with different feature paths: aggregates only, and sequences with occlusion influence.
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

    rows = scorer.response_rows(served)
    assert rows[0]["model_version"] == "7" and rows[0]["horizon_days"] == synthetic_features.horizon_days
    assert set(rows[0]["influence"]) == set(served_model.spec.behaviors)
    assert abs(sum(rows[0]["influence"].values()) - 1) < 1e-6 or sum(rows[0]["influence"].values()) == 0
    logged = scorer.log_frame(served, as_of, dt.datetime.now(dt.UTC))
    assert {"request_time", "model_version", "user_id", "p_buy", "expected_value", "recency_days"} <= set(logged)


def test_a_user_without_history_before_as_of_is_a_client_error(served_model) -> None:
    scorer = Scorer(served_model, ModelInfo(name="user-value", version="1"), max_events=10, max_users=10)
    late = Event(user_id="late", ts=dt.datetime(2030, 1, 1, tzinfo=dt.UTC), behavior="buy", amount=3.0)
    early = Event(user_id="early", ts=dt.datetime(1997, 1, 1, tzinfo=dt.UTC), behavior="view")
    with pytest.raises(RequestError) as caught:
        scorer.score([early, late], dt.datetime(1998, 1, 1, tzinfo=dt.UTC))
    assert caught.value.status == 422 and caught.value.loc == ["events", 1, "ts"] and "'late'" in caught.value.problem

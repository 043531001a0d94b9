"""One bad request never fails another: valid requests sent concurrently with one request of each bad
kind (issue 19) are each answered exactly as when sent alone, each bad one gets its own 4xx naming the
field, the service logs no traceback, and the prediction log stays readable."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.serving import EVAL_CUTOFF, Server, eval_users, events_of, wait_until
from uservalue import limits
from uservalue.serving.prediction_log import read_prediction_log

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

EVENT = {"user_id": "poison", "ts": "1997-03-01T10:00:00Z", "behavior": "buy", "amount": 3.0}


def _with(**change: object) -> dict:
    return {"events": [{**EVENT, **change}], "as_of": EVAL_CUTOFF}


# name: (body, expected status, the loc the error must name)
BAD_KINDS: dict[str, tuple[object, int, list]] = {
    "as_of out of pandas' range": ({**_with(), "as_of": "9999-12-31T00:00:00Z"}, 400, ["as_of"]),
    "ts and as_of before pandas' range": ({"events": [{**EVENT, "ts": "1400-01-01"}], "as_of": "1500-01-01"},
                                          400, ["events", 0, "ts"]),
    "ts in year 1": (_with(ts="0001-01-01T00:00:00Z"), 400, ["events", 0, "ts"]),
    "ts in the future": (_with(ts="2999-01-01T00:00:00Z"), 400, ["events", 0, "ts"]),
    "amount overflowing float32": (_with(amount=1.7e308), 400, ["events", 0, "amount"]),
    "amount over the limit": (_with(amount=limits.AMOUNT_MAX * 2), 400, ["events", 0, "amount"]),
    "amount of a view": (_with(behavior="view", amount=999), 400, ["events", 0, "amount"]),
    "amount as a string": (_with(amount="3"), 400, ["events", 0, "amount"]),
    "NUL in user_id": (_with(user_id="a\x00b"), 400, ["events", 0, "user_id"]),
    "batch separator in user_id": (_with(user_id="a\x1fb"), 400, ["events", 0, "user_id"]),
    "unknown top-level key": ({**_with(), "debug": True}, 400, ["debug"]),
    "unknown behaviour": (_with(behavior="click"), 400, ["events", 0, "behavior"]),
    "no history before as_of": (_with(ts="1999-03-01T00:00:00Z"), 422, ["events", 0, "ts"]),
    "too many events of one user": ({"events": [EVENT] * (limits.MAX_EVENTS_PER_USER + 1), "as_of": EVAL_CUTOFF},
                                    413, ["events"]),
}
BIG_BODY = b'{"events": [' + b",".join([b'{"user_id": "u", "ts": "1997-03-01", "behavior": "view"}'] * 700_000) + b"]}"


def _post(server: Server, body: object) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{server.url}/predict", content=body, timeout=120,
                          headers={"content-type": "application/json"})
    return server.post("/predict", body)


def _scores(response: httpx.Response) -> list[tuple[str, float, float]]:
    assert response.status_code == 200, response.text
    return [(row["user_id"], row["p_buy"], row["expected_value"]) for row in response.json()["predictions"]]


def test_each_valid_request_is_answered_as_if_alone(server: Server, served_project: Path) -> None:
    users = eval_users(served_project, 10, offset=2)
    valid = [{"events": events_of(served_project, [user]), "as_of": EVAL_CUTOFF} for user in users]
    alone = [_scores(server.post("/predict", body)) for body in valid]
    assert len(BIG_BODY) > limits.MAX_BODY_BYTES
    # Three rounds of every valid request, one of every bad kind and the oversized body, shuffled and sent at once.
    mixed: list[tuple[str, object]] = [(f"valid {i}", body) for _ in range(3) for i, body in enumerate(valid)]
    mixed += [(name, body) for name, (body, _, _) in BAD_KINDS.items()] + [("body over MAX_BODY_BYTES", BIG_BODY)]
    random.Random(19).shuffle(mixed)
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(zip(mixed, pool.map(lambda item: _post(server, item[1]), mixed), strict=True))
    for (name, _), response in answers:
        if name.startswith("valid"):
            index = int(name.split()[1])
            # The same users and numbers (to rounding: a batch multiplies larger matrices).
            scores, reference = _scores(response), alone[index]
            assert [s[0] for s in scores] == [r[0] for r in reference], name
            numbers = [value for row in scores for value in row[1:]]
            assert numbers == pytest.approx([value for row in reference for value in row[1:]], rel=1e-9), name
        elif name == "body over MAX_BODY_BYTES":
            assert response.status_code == 413, response.text
        else:
            _, status, loc = BAD_KINDS[name]
            assert response.status_code == status, (name, response.text)
            assert any(item["loc"] == loc for item in response.json()["detail"]), (name, response.text)
    output = server.output_path.read_text()
    assert "Traceback" not in output and "OutOfBoundsDatetime" not in output
    assert "client error" in output  # the 400s: one INFO line each
    # The log holds the valid predictions (flushed every 0.5 s) and reads back whole.
    logged = wait_until(lambda: set(users) <= set(read_prediction_log(server.log_dir)["user_id"]), 30)
    assert logged, sorted(read_prediction_log(server.log_dir)["user_id"].unique())
    frame = read_prediction_log(server.log_dir)
    assert "poison" not in set(frame["user_id"])
    assert frame.select_dtypes("floating").abs().max().max() < float("inf")


def test_a_failing_prediction_log_loses_rows_never_answers(served_project: Path, tmp_path: Path) -> None:
    """The original fault (issue 19): the prediction log raised outside the per-request fallback and every
    request of the batch got a 500. A real closed PredictionLog refuses every append: concurrent requests
    are still each answered, with the numbers they get alone."""
    import asyncio

    from uservalue.models.base import ModelInfo
    from uservalue.models.catalog import load_model
    from uservalue.serving.batching import BatchingPredictor
    from uservalue.serving.prediction_log import PredictionLog
    from uservalue.serving.requests import PredictRequest
    from uservalue.serving.scorer import Scorer

    model = load_model(served_project / "models/linear/model")
    scorer = Scorer(model, ModelInfo(name="user-value", version="1"), max_events=10_000, max_users=60)
    users = eval_users(served_project, 6, offset=6)
    requests = [PredictRequest.model_validate({"events": events_of(served_project, [u]), "as_of": EVAL_CUTOFF})
                for u in users]
    healthy = BatchingPredictor(scorer, PredictionLog(tmp_path / "healthy"))
    broken_log = PredictionLog(tmp_path / "broken")
    broken_log.close()  # append() now raises RuntimeError
    broken = BatchingPredictor(scorer, broken_log)

    async def together(predictor: BatchingPredictor) -> list:
        return await asyncio.gather(*(predictor.predict(r.events, r.as_of) for r in requests))

    expected, answers = asyncio.run(together(healthy)), asyncio.run(together(broken))
    assert broken.largest_batch > 1  # they were scored together
    for want, got in zip(expected, answers, strict=True):
        assert [p["user_id"] for p in got["predictions"]] == [p["user_id"] for p in want["predictions"]]
        assert [p["expected_value"] for p in got["predictions"]] == \
            pytest.approx([p["expected_value"] for p in want["predictions"]], rel=1e-9)
    healthy.close()

"""A trivial BentoML service with the real service's input type and a fixed answer: BentoML's own cost."""

from __future__ import annotations

import datetime as dt
from typing import Any

import bentoml

from uservalue.serving.requests import Event


@bentoml.service(name="trivial", workers=1)
class Trivial:
    @bentoml.api(route="/predict")
    def predict(self, events: list[Event], as_of: dt.datetime | None = None) -> dict[str, Any]:
        return {"predictions": [{"user_id": events[0].user_id, "p_buy": 0.5, "expected_value": 1.0}]}

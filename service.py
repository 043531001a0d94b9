"""The BentoML service: the registered champion behind HTTP (POST /predict by user ids and/or events, POST
/events, POST /recommend (top-k items, the packaged recommender), POST /metadata; GET /metrics, /readyz,
/livez). Thin on purpose: the work is in uservalue.serving (docs/serving.md). Built by the `package` stage,
started by `make serve`."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

import bentoml
from pydantic import BaseModel
from starlette.responses import JSONResponse

from uservalue.serving.auth import ApiKeyMiddleware, BodyLimitMiddleware, JsonOnlyMiddleware
from uservalue.serving.recommend import RecommendRequest
from uservalue.serving.requests import (
    ClientErrorLogFilter,
    Event,
    EventsRequest,
    Identifier,
    LoggedEvent,
    PredictRequest,
    RequestError,
    openapi_contract,
)
from uservalue.serving.settings import exit_with_parent
from uservalue.serving.traffic import install as install_timeout_middleware


class BentoArguments(BaseModel):
    # The package stage passes the exact tag it imported; "latest" only serves a development run.
    model_tag: str = "user-value:latest"
    # The recommender packaged beside it (registry model recs.model_name); none: /recommend answers 503.
    recs_tag: str | None = None


ARGUMENTS = bentoml.use_arguments(BentoArguments)

# A request BentoML's validation refuses is the client's mistake: one INFO line, not an ERROR traceback.
logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorLogFilter())
# BentoML's request timeout timer outlives each answered request by traffic.timeout, keeping its tracing
# span alive: the worker's RSS grew by req/s x 60 s of dead requests under load (issue 19, bench/load.py).
# Before the app is built: the same timeout, its timer cancelled once the response starts.
install_timeout_middleware()


@bentoml.service(name="uservalue", traffic={"timeout": 60}, workers=1)
class UserValueService:
    # Declared at class scope so `bentoml build` packages the model (BentoML issues #4702, #5319).
    bento_model = bentoml.models.BentoModel(ARGUMENTS.model_tag)
    recs_model = bentoml.models.BentoModel(ARGUMENTS.recs_tag) if ARGUMENTS.recs_tag else None

    def __init__(self) -> None:
        from uservalue.serving.batching import BatchingPredictor, batch_metrics
        from uservalue.serving.bento_model import load_packaged_model
        from uservalue.serving.event_intake import EventIntake
        from uservalue.serving.prediction_log import PredictionLog
        from uservalue.serving.scorer import Scorer
        from uservalue.serving.settings import open_configured_store, serve_settings

        # The worker is its own process group: if the server above it is killed (kill -9), it must not
        # outlive it holding the port. It stops as on SIGTERM, flushing its logs.
        exit_with_parent()
        settings = serve_settings()
        model, self.info, self.metadata_record = load_packaged_model(self.bento_model)
        self.store = open_configured_store(settings)
        scorer = Scorer(model, self.info, max_events=settings.max_events, max_users=settings.max_users,
                        store=self.store)
        self.intake = EventIntake(self.store, settings, model.spec.behaviors)
        from uservalue.serving.recommend import Recommending

        self.recommending = Recommending.from_bento_model(self.recs_model, self.store, settings.max_events)
        self.metadata_record = {**self.metadata_record, "recs_model": self.recommending.info or None}
        # Concurrent requests are scored together (see BatchingPredictor): one feature query and
        # one forward pass per batch instead of per request.
        self.predictor = BatchingPredictor(
            scorer, PredictionLog(settings.log_dir, settings.log_flush_records, settings.log_flush_seconds),
            max_wait_ms=settings.batch_wait_ms, observe=batch_metrics())

    @bentoml.api(route="/predict", input_spec=PredictRequest)
    async def predict(self, user_ids: list[Identifier], events: list[Event],
                      as_of: dt.datetime | None, explain: str | None = None) -> dict[str, Any]:
        """p_buy, expected value over the horizon and behaviour influence for every user asked by id or in
        `events`; an unknown id is named under `errors`, the others are answered. explain="effect": each
        user's per-event effects too."""
        try:
            # Encoded here, not by BentoML's output model: that validates the dict against `dict[str, Any]`
            # and builds the route's JSON Schema on every response (~0.4 ms a request; issue 15's profile).
            return JSONResponse(await self.predictor.predict(events, as_of, user_ids, explain=explain))  # type: ignore[return-value]
        except RequestError as error:
            return JSONResponse(error.body(), status_code=error.status)  # type: ignore[return-value]

    @bentoml.api(route="/recommend", input_spec=RecommendRequest)
    def recommend(self, user_id: Identifier | None, events: list[Event], k: int, as_of: dt.datetime | None,
                  exclude_bought: bool) -> dict[str, Any]:
        """The top-k items of one user (by id from the store and/or by events), best first, without the items
        they bought unless exclude_bought is false; from the packaged recommender."""
        try:
            return self.recommending.recommend(user_id, events, k, as_of, exclude_bought)
        except RequestError as error:
            return JSONResponse(error.body(), status_code=error.status)  # type: ignore[return-value]

    @bentoml.api(route="/events", input_spec=EventsRequest)
    def events(self, events: list[LoggedEvent]) -> dict[str, Any]:
        """Append events to their users' stored state (the next /predict by id sees them) and to the event log."""
        try:
            return self.intake.accept(events)
        except RequestError as error:
            return JSONResponse(error.body(), status_code=error.status)  # type: ignore[return-value]

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        """The served model: registry name and version, MLflow run, training data hash, metrics."""
        return self.metadata_record

    @bentoml.on_shutdown
    def close_log(self) -> None:
        # Finish the batch in flight and flush the buffered predictions and events: stopping the
        # service must not lose records.
        self.predictor.close()
        self.intake.close()
        self.store.close()


class ContractMiddleware:
    """Serves /docs.json as BentoML generates it, corrected to what the service answers: the error
    responses (400, 401, 413, 422, 500) with their real body (`detail` is a list of {loc, msg})."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._spec: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        if self._spec is None:
            spec = openapi_contract(UserValueService.openapi_spec.asdict(), {"/recommend": RecommendRequest})
            self._spec = json.dumps(spec).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self._spec)).encode())]})
        await send({"type": "http.response.body", "body": self._spec})


# In this order around the app (Starlette: the first added is the outermost): the key, the body limit,
# JSON only, the contract.
UserValueService.add_asgi_middleware(ApiKeyMiddleware)
UserValueService.add_asgi_middleware(BodyLimitMiddleware)
UserValueService.add_asgi_middleware(JsonOnlyMiddleware)
UserValueService.add_asgi_middleware(ContractMiddleware)

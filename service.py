"""The BentoML service: the registered champion behind HTTP (POST /predict by user ids and/or events, POST
/events, POST /metadata; GET /metrics, /readyz, /livez). Thin on purpose: the work is in uservalue.serving
(docs/serving.md). Built by the `package` stage, started by `make serve`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import bentoml
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from uservalue.serving.auth import ApiKeyMiddleware
from uservalue.serving.requests import Event, Identifier, LoggedEvent, RequestError


class BentoArguments(BaseModel):
    # The package stage passes the exact tag it imported; "latest" only serves a development run.
    model_tag: str = "user-value:latest"


ARGUMENTS = bentoml.use_arguments(BentoArguments)


@bentoml.service(name="uservalue", traffic={"timeout": 60}, workers=1)
class UserValueService:
    # Declared at class scope so `bentoml build` packages the model (BentoML issues #4702, #5319).
    bento_model = bentoml.models.BentoModel(ARGUMENTS.model_tag)

    def __init__(self) -> None:
        from uservalue.serving.batching import BatchingPredictor, batch_metrics
        from uservalue.serving.bento_model import load_packaged_model
        from uservalue.serving.event_intake import EventIntake
        from uservalue.serving.prediction_log import PredictionLog
        from uservalue.serving.scorer import Scorer
        from uservalue.serving.settings import open_configured_store, serve_settings

        settings = serve_settings()
        model, self.info, self.metadata_record = load_packaged_model(self.bento_model)
        self.store = open_configured_store(settings)
        scorer = Scorer(model, self.info, max_events=settings.max_events, max_users=settings.max_users,
                        store=self.store)
        self.intake = EventIntake(self.store, settings, model.spec.behaviors)
        # Concurrent requests are scored together (see BatchingPredictor): one feature query and
        # one forward pass per batch instead of per request.
        self.predictor = BatchingPredictor(
            scorer, PredictionLog(settings.log_dir, settings.log_flush_records, settings.log_flush_seconds),
            max_wait_ms=settings.batch_wait_ms, observe=batch_metrics())

    @bentoml.api(route="/predict")
    async def predict(
        self,
        user_ids: Annotated[list[Identifier], Field(description="users scored from their stored events")] = [],  # noqa: B006
        events: Annotated[list[Event], Field(description="events of users to score (with user_ids: added for "
                                                         "this request only)")] = [],  # noqa: B006
        as_of: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """p_buy, expected value over the horizon and behaviour influence for every user asked by id or in
        `events`; an unknown id is named under `errors`, the others are answered."""
        try:
            return await self.predictor.predict(events, as_of, user_ids)
        except RequestError as error:
            return JSONResponse(error.body(), status_code=error.status)  # type: ignore[return-value]

    @bentoml.api(route="/events")
    def events(
        self,
        events: Annotated[list[LoggedEvent], Field(min_length=1, description="new events; an event_id counts once")],
    ) -> dict[str, Any]:
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


UserValueService.add_asgi_middleware(ApiKeyMiddleware)

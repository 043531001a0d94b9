"""The BentoML service: the registered champion behind HTTP (POST /predict, POST /metadata; GET /metrics,
/readyz, /livez). Thin on purpose: the work is in uservalue.serving (docs/serving.md). Built by the
`package` stage (`bentoml build` with the exact model tag as a Bento argument), started by `make serve`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import bentoml
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from uservalue.serving.auth import ApiKeyMiddleware
from uservalue.serving.requests import Event, RequestError


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
        from uservalue.serving.prediction_log import PredictionLog
        from uservalue.serving.scorer import Scorer
        from uservalue.serving.settings import serve_settings

        settings = serve_settings()
        model, self.info, self.metadata_record = load_packaged_model(self.bento_model)
        scorer = Scorer(model, self.info, max_events=settings.max_events, max_users=settings.max_users)
        # Concurrent requests are scored together (see BatchingPredictor): one feature query and
        # one forward pass per batch instead of per request.
        self.predictor = BatchingPredictor(
            scorer, PredictionLog(settings.log_dir, settings.log_flush_records, settings.log_flush_seconds),
            max_wait_ms=settings.batch_wait_ms, observe=batch_metrics())

    @bentoml.api(route="/predict")
    async def predict(
        self,
        events: Annotated[list[Event], Field(min_length=1, description="recent events of one or many users")],
        as_of: dt.datetime | None = None,
    ) -> dict[str, Any]:
        """p_buy, expected value over the horizon and behaviour influence for every user in `events`."""
        try:
            return await self.predictor.predict(events, as_of)
        except RequestError as error:
            return JSONResponse(error.body(), status_code=error.status)  # type: ignore[return-value]

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        """The served model: registry name and version, MLflow run, training data hash, metrics."""
        return self.metadata_record

    @bentoml.on_shutdown
    def close_log(self) -> None:
        # Finish the batch in flight and flush the buffered predictions: stopping the service
        # must not lose records.
        self.predictor.close()


UserValueService.add_asgi_middleware(ApiKeyMiddleware)

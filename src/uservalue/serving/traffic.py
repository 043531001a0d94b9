"""BentoML's request timeout without its memory cost (issue 19's load benchmark).

BentoML's `TimeoutMiddleware` (traffic.timeout, 60 s here) schedules one `loop.call_later(timeout, ...)`
per request and never cancels it. The timer keeps the request's waiter future and, through the context
it was scheduled in, the request's OpenTelemetry span (attributes, events, locks) alive for the full
timeout after the answer was sent: under load the worker holds `requests/s x timeout` dead requests
(about 11,000 at 180 req/s, 55 MB here), so its RSS climbs for the first minute of any load and stays
there. `install()` puts in a subclass that does the same thing and cancels the timer as soon as the
response starts (or the request ends): the timeout and its 504 are unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import JSONResponse


def _middleware_class() -> type:
    from bentoml._internal.server.http import traffic

    class CancellingTimeoutMiddleware(traffic.TimeoutMiddleware):  # type: ignore[misc, name-defined]
        """BentoML's TimeoutMiddleware (504 when no response has started within `timeout` seconds) that
        cancels its timer once the response starts, instead of leaving it to fire `timeout` seconds later."""

        cancels_timer = True

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] not in ("http", "websocket"):
                await self.app(scope, receive, send)
                return
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

            async def _send(message: Any) -> None:
                if not waiter.done():
                    waiter.set_result(None)
                    timer.cancel()
                await send(message)

            answering = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
            try:
                await waiter
            except TimeoutError:
                if answering.cancel():
                    response = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                            status_code=504)
                    await response(scope, receive, send)
            else:
                await answering
            finally:
                timer.cancel()

    return CancellingTimeoutMiddleware


def install() -> type:
    """Make BentoML's HTTP app use CancellingTimeoutMiddleware (it looks the class up in
    `bentoml._internal.server.http.traffic` each time it builds the app's middleware); call before the
    service's app is built, e.g. at the import of service.py. Idempotent; returns the class in use."""
    from bentoml._internal.server.http import traffic

    if not getattr(traffic.TimeoutMiddleware, "cancels_timer", False):
        traffic.TimeoutMiddleware = _middleware_class()
    return traffic.TimeoutMiddleware

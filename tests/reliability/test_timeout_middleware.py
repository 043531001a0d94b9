"""The request timeout the service installs (uservalue.serving.traffic): an answered request leaves nothing
behind, where BentoML's own TimeoutMiddleware keeps each request's context (its tracing span) alive for the
whole timeout (bench/load.py: the worker's RSS grew by req/s x 60 s of them); the 504 is unchanged.
Real BentoML middleware on a real event loop (asyncio's and uvloop's, which BentoML serves with)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from bentoml._internal.server.http import traffic

from uservalue.serving.traffic import install

pytestmark = pytest.mark.reliability

UPSTREAM = traffic.TimeoutMiddleware if not getattr(traffic.TimeoutMiddleware, "cancels_timer", False) \
    else traffic.TimeoutMiddleware.__mro__[1]
REQUEST_STATE: contextvars.ContextVar[object] = contextvars.ContextVar("request_state")  # as a tracing span is


class RequestState:
    """Stands for what a request's context holds (OpenTelemetry's span, BentoML's trace ids)."""


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _too_slow(scope: Any, receive: Any, send: Any) -> None:
    await asyncio.sleep(30)
    await _answer(scope, receive, send)


async def _serve_one(middleware: Any) -> tuple[list[int], bool]:
    """One request through the middleware, in a task of its own (as each request is), its context holding
    a RequestState; the statuses sent, and whether that state is still alive once the request is over (the
    loop still running: closing it drops whatever it had scheduled)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def request() -> weakref.ref[RequestState]:
        state = RequestState()
        REQUEST_STATE.set(state)
        await middleware({"type": "http", "path": "/predict", "method": "POST"}, receive, send)
        return weakref.ref(state)

    state = await asyncio.ensure_future(request())
    for _ in range(3):  # the loop's callbacks of the finished task
        await asyncio.sleep(0)
    gc.collect()
    return [m["status"] for m in sent if m["type"] == "http.response.start"], state() is not None


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_an_answered_request_leaves_nothing_behind(run: Callable[..., Any]) -> None:
    assert run(_serve_one(install()(_answer, timeout=60))) == ([200], False)
    # BentoML's own middleware holds it until its timer fires, 60 s later (what the fix is for).
    assert run(_serve_one(UPSTREAM(_answer, timeout=60))) == ([200], True)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_request_over_the_timeout_still_gets_a_504(run: Callable[..., Any]) -> None:
    assert run(_serve_one(install()(_too_slow, timeout=0.05))) == ([504], False)


def test_install_replaces_bentoml_middleware_once() -> None:
    installed = install()
    assert install() is installed and traffic.TimeoutMiddleware is installed
    assert issubclass(installed, UPSTREAM) and installed is not UPSTREAM

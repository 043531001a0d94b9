"""The service's guards in front of BentoML (ASGI middleware): the API key (the health probes stay open)
and the request body size (limits.MAX_BODY_BYTES)."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from uservalue import limits

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Health probes must work without the key (orchestrators probe them anonymously); nothing else does,
# /metrics included (it tells the model's traffic).
OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz"})
AUTH_SCHEME = "bearer"  # RFC 6750; schemes are case-insensitive (RFC 7235 section 2.1)


def offered_key(headers: dict[str, str]) -> str | None:
    """The key a request offers: `X-API-Key: <key>`, or `Authorization: Bearer <key>` with the scheme in
    any case. A bare `Authorization: <key>` offers nothing (the scheme is required)."""
    if headers.get("x-api-key"):
        return headers["x-api-key"]
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != AUTH_SCHEME:
        return None
    return credentials.strip() or None


async def send_error(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An error response in the service's error shape ({"error", "detail": [{"loc", "msg"}]})."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class ApiKeyMiddleware:
    """ASGI middleware: with an API key configured, every request but the health probes needs
    `Authorization: Bearer <key>` or `X-API-Key: <key>`; others get 401."""

    def __init__(self, app: Any, key_env: str = "USERVALUE_API_KEY") -> None:
        self.app = app
        self.key = os.environ.get(key_env) or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        offered = offered_key(headers)
        if offered and hmac.compare_digest(offered.encode(), self.key.encode()):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, {"error": "missing or wrong API key",
                                     "detail": [{"loc": ["header", "Authorization"],
                                                 "msg": "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"}]},
                         headers=[(b"www-authenticate", b"Bearer")])


class BodyLimitMiddleware:
    """ASGI middleware: a request body over `max_bytes` is a 413 naming the limit, refused before
    BentoML reads it (by its Content-Length, or while a chunked body streams in)."""

    def __init__(self, app: Any, max_bytes: int = limits.MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | str) -> dict[str, Any]:
        return {"error": f"request body too large: {size} bytes",
                "detail": [{"loc": ["body"], "msg": f"{size} bytes; at most {self.max_bytes} bytes "
                                                    "(limits.MAX_BODY_BYTES)"}]}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, 413, self._too_large(int(declared)), headers=[(b"connection", b"close")])
            return
        if declared is not None:  # the server holds the body to its Content-Length
            await self.app(scope, receive, send)
            return
        # A chunked body: read it up to the limit here, then hand it on (BentoML reads it whole anyway).
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                await send_error(send, 413, self._too_large(f"more than {self.max_bytes}"),
                                 headers=[(b"connection", b"close")])
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # http.disconnect, when it comes
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)




JSON_MEDIA_TYPE = "application/json"


class JsonOnlyMiddleware:
    """ASGI middleware: a POST whose Content-Type is not JSON is a 415 (BentoML would parse a form or a
    multipart body, or a pickle, and fail with a 500). No Content-Type is read as JSON."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            declared = dict(scope.get("headers", [])).get(b"content-type", b"").decode("latin-1")
            media_type = declared.split(";")[0].strip().lower()
            if media_type and media_type != JSON_MEDIA_TYPE and not media_type.endswith("+json"):
                await send_error(send, 415, {"error": f"unsupported Content-Type {declared!r}",
                                             "detail": [{"loc": ["header", "Content-Type"],
                                                         "msg": f"{declared!r}; expected {JSON_MEDIA_TYPE}"}]})
                return
        await self.app(scope, receive, send)

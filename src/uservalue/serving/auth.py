"""API-key check for the service (ASGI middleware); the health probes stay open."""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

# Health probes must work without the key (orchestrators probe them anonymously).
OPEN_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})


class ApiKeyMiddleware:
    """ASGI middleware: with an API key configured, every request but the health probes needs
    `Authorization: Bearer <key>` or `X-API-Key: <key>`; others get 401."""

    def __init__(self, app: Any, key_env: str = "USERVALUE_API_KEY") -> None:
        self.app = app
        self.key = os.environ.get(key_env) or None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        offered = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        if offered and hmac.compare_digest(offered.encode(), self.key.encode()):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "missing or wrong API key",
                           "detail": [{"loc": ["header", "Authorization"],
                                       "msg": "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"}]}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

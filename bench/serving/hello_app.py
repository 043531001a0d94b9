"""A bare ASGI app answering fixed JSON: the floor any HTTP service on this machine starts from."""

import json

BODY = json.dumps({"predictions": [{"user_id": "u1", "p_buy": 0.5, "expected_value": 1.0}]}).encode()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": BODY})

"""A tiny ASGI upstream for TLS and HTTP/2 end-to-end tests, served by hypercorn with a
certificate: every POST gets a chat completion whose id names the HTTP version it came in on
(`chatcmpl-http-2`, `chatcmpl-http-1.1`)."""

from __future__ import annotations

import json
from typing import Any

from .hostile_upstream import CHAT


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    answer = {**CHAT, "id": f"chatcmpl-http-{scope['http_version']}"}
    body = json.dumps(answer).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})

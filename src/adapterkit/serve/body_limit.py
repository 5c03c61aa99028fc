"""A cap on request body size, enforced before the body is parsed (ASGI middleware).

A declared ``Content-Length`` above the cap is refused at once; a body sent
without one (chunked) is counted as it arrives and refused once it passes
the cap. Either way the answer is a 413 in OpenAI's error shape.
"""

from __future__ import annotations

import json
from typing import Any

from adapterkit.serve.errors import TooLarge

Scope = dict[str, Any]


class _TooLargeBody(Exception):
    pass


class BodySizeLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        seen = 0
        started = exceeded = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    raise _TooLargeBody
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            if exceeded and not started:
                return  # FastAPI turns the exception into a 400 ("error parsing the body"): the 413 replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLargeBody:
            pass
        if exceeded and not started:
            await self._refuse(send, seen)

    async def _refuse(self, send: Any, size: int) -> None:
        error = TooLarge(f"the request body has {size} bytes or more; this server accepts at most "
                         f"{self.max_bytes} (--max-body-bytes)", code="body_too_large")
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

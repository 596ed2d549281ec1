"""Body size limit as a pure ASGI middleware: a declared ``Content-Length`` over the limit is refused
before reading, and a chunked body is counted as it arrives."""

from __future__ import annotations

import json

from fastapi import HTTPException

#: Default request body limit: a few full-size inputs as base64 .npy, far below memory trouble.
MAX_BODY_BYTES = 16 * 1024 * 1024


class BodyLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413 ``{"detail": ...}``."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _reply(send, 413, f"request body of {declared.decode(errors='replace')} bytes is over "
                                    f"the limit of {self.max_bytes} bytes")
            return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside FastAPI's body read, which re-raises HTTPException to the handlers.
                    raise HTTPException(413, f"request body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, counted_receive, send)


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

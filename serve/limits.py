"""Body size limit as a pure ASGI middleware: a body over the limit is refused with 413 ``{"detail": ...}``,
whether its ``Content-Length`` declares it or a chunked body grows past the limit as it arrives.

The 413 goes out only after the rest of the body is read and discarded (up to :data:`DRAIN_BYTES`): a
server that answers and closes while the client is still sending resets the connection, and clients
that send the whole body before reading (Python's ``urllib``) then see a reset instead of the 413.
"""

from __future__ import annotations

import json

from fastapi import HTTPException

#: Default request body limit: a few full-size inputs as base64 .npy, far below memory trouble.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Most bytes of a refused body read and thrown away so that the client can read the 413; a body
#: longer than this still gets the 413, but may see the connection close before it is sent.
DRAIN_BYTES = 64 * 1024 * 1024


class BodyLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413 ``{"detail": ...}``."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, drain_bytes: int = DRAIN_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._drain(receive, 0)
            await _reply(send, 413, f"request body of {declared.decode(errors='replace')[:40]} bytes is over "
                                    f"the limit of {self.max_bytes} bytes")
            return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await self._drain(receive, received)
                    # Raised inside FastAPI's body read, which re-raises HTTPException to the handlers.
                    raise HTTPException(413, f"request body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, counted_receive, send)

    async def _drain(self, receive, already: int) -> None:
        """Read and discard the rest of the body, at most ``drain_bytes`` in all."""
        read = already
        while read <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def _reply(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

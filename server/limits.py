"""The request-body limit of `vmr serve`: an ASGI middleware that answers 413 before a large body is read."""
from __future__ import annotations

from fastapi.responses import JSONResponse

MAX_BODY_BYTES = 16 * 1024  # a label is ~300 bytes


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _error(413 if declared.isdigit() else 400, f"request body over {self.limit} bytes"
                                if declared.isdigit() else "bad Content-Length")(scope, receive, send)
        if declared is not None:
            return await self.app(scope, receive, send)
        # No declared length (chunked): read at most limit + 1 bytes, then replay them to the app.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > self.limit:
                return await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)

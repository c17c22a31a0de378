"""Request body caps, answered in the gateway's JSON error shape.

Pure ASGI and only on the request side: it adds nothing per response chunk. A declared Content-Length over
the cap is refused before a byte of the body is read; a chunked body is cut off as soon as it passes the cap,
so an oversized upload is never held in memory or on disk.
"""

from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import GatewayError, error_response
from core.settings import MIB


class BodyTooLarge(GatewayError):
    def __init__(self, limit: int) -> None:
        size = f"{limit / MIB:g} MB" if limit >= MIB else f"{limit / 1024:g} KB"
        super().__init__(413, f"request body too large: the limit is {size}")


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        default_limit: int,
        limits: dict[str, int],
        prefix_limits: dict[str, int] | None = None,
        unlimited_prefixes: tuple[str, ...] = (),
    ) -> None:
        """`limits` maps exact paths to their own caps, `prefix_limits` path prefixes; paths under
        `unlimited_prefixes` (streamed straight through, never held) have none; every other path gets
        `default_limit`."""
        self.app = app
        self.default_limit = default_limit
        self.limits = limits
        self.prefix_limits = prefix_limits or {}
        self.unlimited_prefixes = unlimited_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(self.unlimited_prefixes):
            await self.app(scope, receive, send)
            return
        limit = self._limit_of(path)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            error = BodyTooLarge(limit)
            await error_response(error.status, error.message, error.headers, path=path)(scope, receive, send)
            return
        if declared is not None:
            # uvicorn delivers exactly the declared length, and it is within the cap: nothing to count.
            await self.app(scope, receive, send)
            return
        await self.app(scope, _CappedReceive(receive, limit), send)

    def _limit_of(self, path: str) -> int:
        limit = self.limits.get(path)
        if limit is not None:
            return limit
        for prefix, prefix_limit in self.prefix_limits.items():
            if path.startswith(prefix):
                return prefix_limit
        return self.default_limit


class _CappedReceive:
    """`receive` for a body of unknown length (chunked), raising BodyTooLarge once it passes the cap.

    Raised inside the route while it reads its body, so the usual handler answers it. Once the body is
    complete it hands out `receive()` itself: a stream held open for minutes keeps no frame of this."""

    __slots__ = ("_done", "_limit", "_receive", "_received")

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._received = 0
        self._done = False

    def __call__(self) -> Awaitable[Message]:
        return self._receive() if self._done else self._counted()

    async def _counted(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise BodyTooLarge(self._limit)
            self._done = not message.get("more_body", False)
        else:
            self._done = True
        return message


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

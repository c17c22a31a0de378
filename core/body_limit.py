"""Request body caps, answered in the gateway's JSON error shape.

Pure ASGI and only on the request side: it adds nothing per response chunk. A declared Content-Length over
the cap is refused before a byte of the body is read; a chunked body is cut off as soon as it passes the cap,
so an oversized upload is never held in memory or on disk.
"""

from collections.abc import Awaitable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import GatewayError, error_response
from core.settings import MIB


def _size_in_words(size: int, in_mib: bool = False) -> str:
    """A byte count as people configure it: MAX_UPLOAD_MB=25 is 25 MiB and MAX_REQUEST_MB=0.5 is 0.5 MiB,
    and said so; the gateway's own fixed caps are in KiB."""
    # Rounded: MAX_REQUEST_MB=0.01 is a whole number of bytes, 0.00999928 MiB, and was configured as 0.01.
    return f"{round(size / MIB, 4):g} MiB" if in_mib or size >= MIB else f"{round(size / 1024, 4):g} KiB"


class BodyTooLarge(GatewayError):
    def __init__(
        self, limit: int, what: str = "request body", shown_limit: int | None = None, in_mib: bool = False
    ) -> None:
        """`shown_limit`: the limit as configured, when the cap itself allows for framing around it (an
        upload's multipart boundaries): the allowance is the gateway's business, not the person's."""
        size = _size_in_words(limit if shown_limit is None else shown_limit, in_mib)
        super().__init__(413, f"{what} too large: the limit is {size}")


@dataclass(frozen=True)
class Cap:
    """A path's cap in bytes, and how a refusal names what was too large."""

    limit: int
    what: str = "request body"
    shown_limit: int | None = None
    in_mib: bool = False  # configured in MiB (MAX_*_MB): said in MiB, whatever its size

    def refusal(self) -> BodyTooLarge:
        return BodyTooLarge(self.limit, self.what, self.shown_limit, self.in_mib)


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        default_limit: int,
        limits: dict[str, int | Cap],
        prefix_limits: dict[str, int] | None = None,
        unlimited_prefixes: tuple[str, ...] = (),
    ) -> None:
        """`limits` maps exact paths to their own caps, `prefix_limits` path prefixes; paths under
        `unlimited_prefixes` (streamed straight through, never held) have none; every other path gets
        `default_limit`."""
        self.app = app
        self.limits = {path: cap if isinstance(cap, Cap) else Cap(cap) for path, cap in limits.items()}
        self.prefix_limits = {prefix: Cap(limit) for prefix, limit in (prefix_limits or {}).items()}
        self.default_cap = Cap(default_limit)
        self.unlimited_prefixes = unlimited_prefixes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Returns the app's own coroutine rather than awaiting it in one of this layer's: a stream held open
        # for minutes keeps no frame of this.
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(self.unlimited_prefixes):
            return self.app(scope, receive, send)
        cap = self._cap_of(path)
        declared = _declared_length(scope)
        if declared is not None and declared > cap.limit:
            error = cap.refusal()
            return error_response(error.status, error.message, error.headers, path=path)(scope, receive, send)
        if declared is not None:
            # uvicorn delivers exactly the declared length, and it is within the cap: nothing to count.
            return self.app(scope, receive, send)
        return self.app(scope, _CappedReceive(receive, cap), send)

    def _cap_of(self, path: str) -> Cap:
        cap = self.limits.get(path)
        if cap is not None:
            return cap
        for prefix, prefix_cap in self.prefix_limits.items():
            if path.startswith(prefix):
                return prefix_cap
        return self.default_cap


class _CappedReceive:
    """`receive` for a body of unknown length (chunked), raising BodyTooLarge once it passes the cap.

    Raised inside the route while it reads its body, so the usual handler answers it. Once the body is
    complete it hands out `receive()` itself: a stream held open for minutes keeps no frame of this."""

    __slots__ = ("_cap", "_done", "_receive", "_received")

    def __init__(self, receive: Receive, cap: Cap) -> None:
        self._receive = receive
        self._cap = cap
        self._received = 0
        self._done = False

    def __call__(self) -> Awaitable[Message]:
        return self._receive() if self._done else self._counted()

    async def _counted(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._cap.limit:
                raise self._cap.refusal()
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

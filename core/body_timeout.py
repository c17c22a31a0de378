"""A time limit on request bodies, on every route.

uvicorn times nothing once a request's head has arrived: a client that sends its headers and then trickles
its body a byte at a time holds a connection (and a descriptor) for as long as it likes, and a few hundred
such clients exhaust the process. Here the gateway allows REQUEST_BODY_TIMEOUT seconds of waiting for a body,
plus one second for every BYTES_PER_EXTRA_SECOND that arrive, but never more than REQUEST_BODY_TIMEOUT in
hand: an upload at that rate or faster always finishes, however large, a trickle is cut off with 408, and
no client can stall longer than the timeout at a time.

Only time spent waiting on the client counts: the clock runs while the app awaits `receive()` and the body is
not complete. When the gateway itself is slow to read (a blob streamed to a busy Ollama), the client is not
blamed. Pure ASGI, request side only: nothing is added per response chunk.
"""

import asyncio
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import GatewayError

# A floor of 16 KB/s: far below any network people use, far above a deliberate trickle.
BYTES_PER_EXTRA_SECOND = 16 * 1024


class BodyTimedOut(GatewayError):
    def __init__(self, timeout: float) -> None:
        super().__init__(
            408,
            f"the request body did not arrive in time ({timeout:g} s, plus 1 s per "
            f"{BYTES_PER_EXTRA_SECOND // 1024} KB received)",
        )


class BodyTimeoutMiddleware:
    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, _TimedReceive(receive, self.timeout), send)


class _TimedReceive:
    """`receive`, timed while it waits for the body. Once the body is complete it hands out `receive()`
    itself: waiting for a disconnect is not waiting for a body, and a stream held open for minutes keeps no
    frame of this."""

    __slots__ = ("_allowance", "_done", "_receive", "_timeout")

    def __init__(self, receive: Receive, timeout: float) -> None:
        self._receive = receive
        self._timeout = timeout
        self._allowance = timeout
        self._done = False

    def __call__(self) -> Awaitable[Message]:
        return self._receive() if self._done else self._timed()

    async def _timed(self) -> Message:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self._allowance):
                message = await self._receive()
        except TimeoutError:
            raise BodyTimedOut(self._timeout) from None
        self._allowance -= loop.time() - started
        if message["type"] == "http.request":
            # Earned by what arrives, but never more than the timeout at a time: a client that sent fast
            # can't bank the time to stall for an hour before its last byte.
            earned = len(message.get("body", b"")) / BYTES_PER_EXTRA_SECOND
            self._allowance = min(self._timeout, self._allowance + earned)
            self._done = not message.get("more_body", False)
        else:
            self._done = True
        return message

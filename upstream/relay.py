"""Pass-through relay of an upstream response to the client, byte for byte, as it arrives.

Written as a bare ASGI response rather than Starlette's StreamingResponse: per chunk it does one read and one
`send`, nothing else, which is what keeps hundreds of concurrent streams near nginx's speed.

Three things happen beside the copy loop:
- The client going away is watched on `receive()` (uvicorn silently drops writes to a closed connection, so
  the copy loop alone would not notice). The upstream connection is closed at once: closing it is the only
  way to make Ollama stop generating.
- A watchdog enforces the idle timeout between upstream chunks, without a timer per chunk.
- If the upstream fails mid-stream, the client gets one last line saying so, in the stream's own format, as
  Ollama itself does (an error after streaming began keeps status 200; the error is the last line).
"""

import asyncio
import json

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from upstream.client import Upstream, error_from
from upstream.headers import downstream_response_headers
from upstream.http11 import UpstreamError, UpstreamResponse

STREAMING_HEADERS = [(b"x-accel-buffering", b"no"), (b"cache-control", b"no-cache")]


def _ndjson_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


def _sse_error(message: str) -> bytes:
    payload = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _error_tail(content_type: bytes, message: str, last_chunk: bytes) -> bytes:
    """The closing error line for a stream cut short, or nothing for bodies that aren't line-framed."""
    if b"ndjson" in content_type:
        separator = b"" if last_chunk.endswith(b"\n") else b"\n"
        return separator + _ndjson_error(message)
    if b"event-stream" in content_type:
        separator = b"" if last_chunk.endswith(b"\n\n") else b"\n\n"
        return separator + _sse_error(message)
    return b""


class RelayResponse(Response):
    def __init__(self, upstream_response: UpstreamResponse, idle_timeout: float) -> None:
        self._upstream = upstream_response
        self._idle_timeout = idle_timeout
        self.status_code = upstream_response.status
        self.background = None
        headers = downstream_response_headers(upstream_response.headers)
        self._content_type = (upstream_response.header(b"content-type") or b"").lower()
        if b"ndjson" in self._content_type or b"event-stream" in self._content_type:
            headers += STREAMING_HEADERS
        self.raw_headers = headers
        self._awaiting_upstream_since: float | None = None
        self._idle_expired = False
        self._watchdog: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        disconnect_watch = loop.create_task(self._close_upstream_on_disconnect(receive))
        self._watchdog = loop.call_later(self._idle_timeout, self._check_idle)
        tail = b""
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            tail = await self._copy_body(send)
        finally:
            self._watchdog.cancel()
            disconnect_watch.cancel()
            self._upstream.release()
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def _copy_body(self, send: Send) -> bytes:
        """Copy until the upstream ends; return the error tail to append if it ended badly."""
        loop = asyncio.get_running_loop()
        upstream = self._upstream
        last_chunk = b"\n"
        try:
            while True:
                self._awaiting_upstream_since = loop.time()
                chunk = await upstream.read_chunk()
                self._awaiting_upstream_since = None
                if not chunk:
                    return b""
                last_chunk = chunk
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError:
            if self._idle_expired:
                reason = f"Ollama sent nothing for {self._idle_timeout:g} s (upstream idle timeout)"
            else:
                reason = "the connection to Ollama was lost mid-stream"
            return _error_tail(self._content_type, reason, last_chunk)

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        since = self._awaiting_upstream_since
        remaining = self._idle_timeout if since is None else since + self._idle_timeout - loop.time()
        if remaining > 0:
            self._watchdog = loop.call_later(remaining, self._check_idle)
            return
        self._idle_expired = True
        self._upstream.close()

    async def _close_upstream_on_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._upstream.close()


async def relay(
    upstream: Upstream, method: str, path: str, *, headers: list[tuple[str, str]], body: bytes | None
) -> Response:
    """Forward one request to Ollama and answer with its response, streamed through unchanged.

    Ollama's own errors (404 unknown model, 400 bad request, ...) keep their status and message."""
    response = await upstream.send(method, path, headers=headers, body=body)
    if response.status >= 400:
        try:
            raise await error_from(response, upstream.timeouts.idle)
        finally:
            response.close()
    return RelayResponse(response, upstream.timeouts.idle)

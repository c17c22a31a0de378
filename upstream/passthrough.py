"""Pass-through relay of an upstream response to the client, as it arrives.

Written as a bare ASGI response rather than Starlette's StreamingResponse: per chunk it does one read and one
`send`, nothing else, which is what keeps hundreds of concurrent streams near nginx's speed.

Beside the copy loop:
- The client going away is watched on `receive()` (uvicorn silently drops writes to a closed connection, so
  the copy loop alone would not notice). The upstream connection is closed at once: closing it is the only
  way to make Ollama stop generating.
- A watchdog enforces the idle timeout between upstream chunks, without a timer per chunk.
- Line-framed streams (NDJSON, SSE) are relayed line for line: a piece of a line waits for its end, which
  Ollama flushes with it, so a stream cut short never hands the client half a JSON object.
- A line-framed stream's response head waits for its first line (Ollama sends no header before it anyway,
  so the wait costs nothing), and that line is checked once: an NDJSON stream must open with a JSON object,
  an event stream with an SSE field. Anything else (a proxy's error page, a crashed server's noise) is
  answered 502, as is Ollama failing before that first line (504 if it went silent), rather than relayed
  as a 200 stream no client could parse. Nothing is parsed per line after that.
- A line-framed stream that arrives compressed (a proxy compressing although the gateway asks Ollama for
  `Accept-Encoding: identity`) can't be cut at line ends: it is answered 502, saying so. Any other body is
  relayed as it came, with its Content-Encoding. Of Ollama's headers only an allow-list reaches the client
  (`upstream.headers`).
- If the upstream fails mid-stream, a line-framed stream ends with one last line saying so, in its own format,
  as Ollama itself does (an error after streaming began keeps status 200). Any other body is left
  unterminated, so the client sees it was cut short instead of taking a truncated body for a whole one.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from core.errors import GatewayError, error_response
from upstream.client import Upstream, content_coding, error_from
from upstream.headers import downstream_response_headers
from upstream.http11 import UpstreamError, UpstreamResponse

STREAMING_HEADERS = [(b"x-accel-buffering", b"no"), (b"cache-control", b"no-cache")]
# How an event stream's first line may begin: one of the fields of the SSE format, or a comment.
SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")
# Enough of the first line to tell what it is (the longest SSE field name, with its colon).
FIRST_LINE_PREFIX = 6


async def until_disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (what it still sends, if anything, is dropped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _ndjson_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


def _sse_error(message: str) -> bytes:
    payload = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


@dataclass(frozen=True)
class RelayEnd:
    """How a relayed answer ended, told to whoever held a slot for it (fleet.admission)."""

    completed: bool  # Ollama's answer arrived whole and was sent on
    client_gone: bool  # the client went away first
    upstream_failed: bool  # the connection to Ollama failed (not because the client left)
    tail: bytes  # the answer's last bytes as sent, where Ollama puts its counters (upstream.counters)
    line_framed: bool  # a stream of lines (the tail ends with its last line), or a whole answer
    event_stream: bool = False  # server-sent events (the OpenAI-style API)
    lines: int = 0  # lines sent, of a line-framed stream: about one token each (usage.reading)
    first_byte_at: float | None = None  # time.monotonic() when the answer's head went out
    held: bytes = b""  # the usage event held back from a client that did not ask for it (below)


# The last event of an OpenAI-style stream when the request asked for usage: no choices, only the counts.
_USAGE_KEY = b'"usage"'
_NO_CHOICES = b'"choices":[]'


class RelayResponse(Response):
    def __init__(
        self,
        upstream_response: UpstreamResponse,
        idle_timeout: float,
        on_end: Callable[[RelayEnd], None] | None = None,
        hide_usage: bool = False,
    ) -> None:
        self._upstream = upstream_response
        self._on_end = on_end
        self._lines = 0
        self._first_byte_at: float | None = None
        self._held = b""
        # The last two pieces sent: a line-framed stream's final line is the last piece's end (pieces end at
        # a line's end); a whole answer's counters may straddle the two. Kept by reference, never copied.
        self._before_last = self._last = b""
        self._completed = self._client_gone = self._upstream_failed = False
        self._idle_timeout = idle_timeout
        self.status_code = upstream_response.status
        self.background = None
        content_type = (upstream_response.header(b"content-type") or b"").lower()
        self._is_sse = b"event-stream" in content_type
        self._line_framed = self._is_sse or b"ndjson" in content_type
        # The gateway asked Ollama for usage (usage.openai) where the client did not: that event is its own.
        self._hide_usage = hide_usage and self._is_sse
        headers = downstream_response_headers(upstream_response.headers)
        self.raw_headers = headers + STREAMING_HEADERS if self._line_framed else headers
        self._awaiting_upstream_since: float | None = None
        self._idle_expired = False
        self._watchdog: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        disconnect_watch = loop.create_task(self._close_upstream_on_disconnect(receive))
        self._watchdog = loop.call_later(self._idle_timeout, self._check_idle)
        refusal: GatewayError | None = None
        ending: bytes | None = None
        started = cancelled = False
        try:
            first = b""
            if self._line_framed:
                first, refusal = await self._first_line()
            if refusal is None:
                await send(
                    {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                )
                self._first_byte_at = time.monotonic()
                started = True
                ending = await self._copy_body(send, first)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when GRACEFUL_SHUTDOWN_SECONDS are over. A line-framed stream
            # still gets its last line saying so, as for any failure mid-stream, instead of being cut.
            if not (started and self._line_framed):
                raise
            cancelled = True
            ending = self._error_line("the gateway is shutting down")
        finally:
            self._watchdog.cancel()
            disconnect_watch.cancel()
            self._upstream.release()
            if self._on_end is not None:
                self._on_end(
                    RelayEnd(
                        completed=self._completed and not self._client_gone,
                        client_gone=self._client_gone,
                        upstream_failed=self._upstream_failed and not self._client_gone,
                        tail=self._before_last + self._last,
                        line_framed=self._line_framed,
                        event_stream=self._is_sse,
                        lines=self._lines,
                        first_byte_at=self._first_byte_at,
                        held=self._held,
                    )
                )
        if refusal is not None:
            await error_response(refusal.status, refusal.message, path=scope["path"])(scope, receive, send)
        elif ending is not None:
            await send({"type": "http.response.body", "body": ending, "more_body": False})
        # else: returning without the final message makes uvicorn drop the connection mid-body.
        if cancelled:
            raise asyncio.CancelledError

    async def _first_line(self) -> tuple[bytes, GatewayError | None]:
        """The stream's first bytes (at least the start of its first line, unless the body is empty), or why
        the stream must be refused instead of relayed."""
        loop = asyncio.get_running_loop()
        first = b""
        try:
            while len(first) < FIRST_LINE_PREFIX and b"\n" not in first:
                self._awaiting_upstream_since = loop.time()
                chunk = await self._upstream.read_chunk()
                self._awaiting_upstream_since = None
                if not chunk:
                    break
                first += chunk
        except UpstreamError:
            self._upstream_failed = True
            if self._idle_expired:
                reason = f"Ollama sent nothing for {self._idle_timeout:g} s (upstream idle timeout)"
                return b"", GatewayError(504, reason)
            return b"", GatewayError(502, "the connection to Ollama was lost before its answer began")
        if not first:
            return b"", None  # an empty body is relayed as it is
        if self._is_sse:
            if not first.startswith(SSE_FIELDS):
                return b"", GatewayError(502, "Ollama's answer is not the event stream it announced")
        elif not first.startswith(b"{"):
            return b"", GatewayError(502, "Ollama's answer is not the NDJSON stream it announced")
        return first, None

    async def _copy_body(self, send: Send, first: bytes) -> bytes | None:
        """Copy until the upstream ends, starting with `first` (bytes already read). Returns the last bytes
        to send (an error line if it failed), or None if the body must be left unterminated."""
        loop = asyncio.get_running_loop()
        upstream = self._upstream
        line_framed = self._line_framed
        partial = b""
        try:
            if first:
                end = first.rfind(b"\n") + 1
                if end:
                    self._last = self._relayed_lines(first[:end])
                    await send({"type": "http.response.body", "body": self._last, "more_body": True})
                partial = first[end:]
            while True:
                self._awaiting_upstream_since = loop.time()
                chunk = await upstream.read_chunk()
                self._awaiting_upstream_since = None
                if not chunk:
                    self._completed = True
                    if partial:
                        self._before_last, self._last = self._last, partial
                    return partial
                if line_framed:
                    if partial:
                        chunk, partial = partial + chunk, b""
                    end = chunk.rfind(b"\n") + 1
                    if end < len(chunk):
                        chunk, partial = chunk[:end], chunk[end:]
                    if not chunk:
                        continue
                    chunk = self._relayed_lines(chunk)
                    if not chunk:
                        continue
                self._before_last, self._last = self._last, chunk
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError:
            self._upstream_failed = True
            if not line_framed:
                return None
            if self._idle_expired:
                reason = f"Ollama sent nothing for {self._idle_timeout:g} s (upstream idle timeout)"
            else:
                reason = "the connection to Ollama was lost mid-stream"
            return self._error_line(reason)

    def _relayed_lines(self, chunk: bytes) -> bytes:
        """Whole lines about to be sent: counted, and the usage event taken out if it is the gateway's."""
        if self._hide_usage and _USAGE_KEY in chunk:
            events = chunk.split(b"\n\n")
            kept = []
            for number, event in enumerate(events, 1):
                if _USAGE_KEY in event and _NO_CHOICES in event.replace(b" ", b""):
                    self._held = event
                else:
                    kept.append(event if number == len(events) else event + b"\n\n")
            chunk = b"".join(kept)
        self._lines += chunk.count(b"\n")
        return chunk

    def _error_line(self, reason: str) -> bytes:
        """The last line of a line-framed stream that failed, in the stream's own format."""
        # SSE: the blank line first ends any event left open; on its own it dispatches nothing.
        return b"\n" + _sse_error(reason) if self._is_sse else _ndjson_error(reason)

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
        await until_disconnected(receive)
        self._client_gone = True
        self._upstream.close()


async def relay(
    upstream: Upstream,
    method: str,
    path: str,
    *,
    headers: list[tuple[str, str]],
    body: bytes | AsyncIterator[bytes] | None = None,
    length: int | None = None,
    on_end: Callable[[RelayEnd], None] | None = None,
    hide_usage: bool = False,
) -> Response:
    """Forward one request to Ollama and answer with its response, streamed through unchanged; `on_end`
    hears how the answer ended (not called when this raises: the caller knows then).

    Ollama's own errors (404 unknown model, 400 bad request, ...) keep their status and message. A stream a
    proxy compressed all the same is refused (502): it can't be cut at line ends. Any other compressed body
    is relayed as it is, with its Content-Encoding."""
    response = await upstream.send(method, path, headers=headers, body=body, length=length)
    if response.status >= 400:
        try:
            raise await error_from(response, upstream.timeouts.idle)
        finally:
            response.close()
    relayed = RelayResponse(response, upstream.timeouts.idle, on_end, hide_usage)
    coding = content_coding(response) if relayed._line_framed else None
    if coding is not None:
        response.close()
        raise GatewayError(502, upstream.compressed_message(coding, "stream"))
    return relayed

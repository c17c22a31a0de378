"""A small HTTP/1.1 client for the gateway's one upstream: keep-alive pool, streaming in both directions.

Why not aiohttp or httpx: a relay spends its life reading small chunks from Ollama and writing them on.
Measured on this project's machines, aiohttp's response reader costs 23 us of CPU per chunk, this one 10 us
(httptools' C parser with a plain asyncio protocol); httpx is slower still (encode/httpx#3215). With 400
streams of 50 tokens a second that difference is a third of the gateway's CPU. See README, "Performance".

What it does, and no more: one origin (http or https), requests with a bytes body or a streamed one, responses
framed by Content-Length, chunked encoding or connection close, reading paused when a slow client lets data
pile up (so backpressure reaches Ollama), and closing a connection at once when asked (Ollama stops
generating when its client goes away).
"""

import asyncio
import base64
import ssl
from collections import deque
from collections.abc import AsyncIterable
from urllib.parse import unquote

import httptools
from yarl import URL

# Past this many unread bytes, reading from Ollama pauses until the client catches up.
READ_HIGH_WATER = 256 * 1024
# Idle pooled connections older than this are closed rather than reused.
IDLE_CONNECTION_SECONDS = 60.0


class UpstreamError(Exception):
    """The upstream connection failed, or Ollama answered something that isn't HTTP."""


class _WriteFailed(UpstreamError):
    """The request could not be sent: Ollama cannot have acted on it."""


# Safe to send again when a reused connection dies before any answer: they change nothing upstream.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD"})


class UpstreamResponse:
    """One response, read as it arrives. Call `release()` (or `close()`) when done with it."""

    def __init__(self, connection: "_Connection", head_only: bool) -> None:
        self._connection = connection
        self._loop = connection.loop
        self.head_only = head_only
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self._head = self._loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._complete = False
        self._error: UpstreamError | None = None
        self._delimited_by_close = False
        self.received_anything = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived, or b"" at its end. Raises UpstreamError if cut short."""
        while True:
            if self._chunks:
                data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                if self._buffered > READ_HIGH_WATER:
                    self._connection.resume_reading()
                self._buffered = 0
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter

    async def read(self, limit: int) -> bytes:
        """The body, or its first `limit` bytes."""
        parts, size = [], 0
        while size < limit and (chunk := await self.read_chunk()):
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)[:limit]

    def close(self) -> None:
        """Drop the connection now: Ollama sees its client go away and stops working on the request."""
        self._fail(UpstreamError("closed by the gateway"))
        self._connection.abort()

    def release(self) -> None:
        """Hand the connection back for reuse if this response was read to its end, else drop it."""
        if self._complete and not self._chunks and self._error is None:
            self._connection.finished()
        else:
            self.close()

    # Called by the connection.

    async def _wait_head(self) -> None:
        await self._head

    def _on_head(self, status: int, delimited_by_close: bool) -> None:
        self.status = status
        self._delimited_by_close = delimited_by_close
        if not self._head.done():
            self._head.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH_WATER:
            self._connection.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _connection_lost(self) -> None:
        if self._head.done() and self._delimited_by_close:
            self._finish()  # a body without length or chunking ends when the connection does
        else:
            self._fail(UpstreamError("the connection to Ollama was lost"))

    def _fail(self, error: UpstreamError) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # consumed here: whoever awaits it still gets it
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "ConnectionPool") -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.lost = False
        self.keep_alive = False
        self.idle_since = 0.0
        self._reading_paused = False
        self._drain: asyncio.Future | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or self.parser is None or response._complete:
            self.abort()  # bytes nobody asked for: the connection can't be trusted any more
            return
        response.received_anything = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._protocol_error(f"Ollama sent an invalid HTTP response ({exc})")

    def _protocol_error(self, message: str) -> None:
        if self.response is not None:
            self.response._fail(UpstreamError(message))
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._open.discard(self)
        if self.response is not None:
            self.response._connection_lost()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(_WriteFailed("the connection to Ollama was lost while sending"))
            self._drain.exception()

    def pause_writing(self) -> None:
        self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    # httptools callbacks

    def on_status(self, status: bytes) -> None:
        assert self.response is not None
        self.response.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response, parser = self.response, self.parser
        assert response is not None and parser is not None
        if response._head.done():
            # A second response to one request (or one pipelined behind it): never merge it into the first.
            self._protocol_error("Ollama sent more than one response to one request")
            return
        status = parser.get_status_code()
        if 100 <= status < 200:
            response.headers.clear()  # an interim response: the real one follows
            return
        framed = (
            response.header(b"content-length") is not None
            or b"chunked" in (response.header(b"transfer-encoding") or b"").lower()
        )
        no_body = response.head_only or status in (204, 304)
        response._on_head(status, delimited_by_close=not framed and not no_body)
        if no_body:
            # The parser would wait for a body a HEAD response never has.
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and not response._complete:
            response._feed(body)

    def on_message_complete(self) -> None:
        response = self.response
        # An interim (1xx) response completes a message too, before the real head has arrived.
        if response is None or response._complete or not response._head.done():
            return
        # Asked now: once the message is over the parser has reset and no longer knows.
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()
        response._finish()

    # used by the pool and the response

    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def begin(self, head_only: bool) -> UpstreamResponse:
        self.keep_alive = False
        self.response = UpstreamResponse(self, head_only)
        self.parser = httptools.HttpResponseParser(self)
        return self.response

    async def write(self, data: bytes | memoryview) -> None:
        if self.lost or self.transport is None:
            raise _WriteFailed("the connection to Ollama was lost before the request was sent")
        self.transport.write(data)
        if self._drain is not None:
            await self._drain

    def finished(self) -> None:
        self.response, self.parser = None, None
        if self.keep_alive and self.usable():
            self.pool._give_back(self)
        else:
            self.abort()

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.response, self.parser = None, None
        if self.transport is not None:
            self.transport.abort()


class ConnectionPool:
    """Keep-alive connections to one origin, without a size limit: each open stream holds one for its life."""

    def __init__(self, base_url: str, connect_timeout: float) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"OLLAMA_URL must be an http:// or https:// URL, not {base_url!r}")
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.base_path = url.path.rstrip("/")
        self.connect_timeout = connect_timeout
        host_header = f"[{url.host}]" if ":" in url.host else url.host
        if url.explicit_port:
            host_header += f":{url.port}"
        fixed = [f"Host: {host_header}"]
        if url.user is not None:
            credentials = f"{unquote(url.user)}:{unquote(url.password or '')}".encode()
            fixed.append(f"Authorization: Basic {base64.b64encode(credentials).decode()}")
        self._fixed_headers = fixed
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None = None,
        length: int | None = None,
    ) -> UpstreamResponse:
        """Send a request and wait for the response head. Raises UpstreamError if that fails.

        A reused connection may turn out to have been closed by Ollama (a restart, say). The request then goes
        once more on a fresh connection, but only when that can't make Ollama do the work twice: the request
        could not be written at all, or it is a GET or HEAD and nothing of the answer had arrived. A streamed
        body can't be replayed and is never retried."""
        may_retry = not isinstance(body, AsyncIterable)
        while True:
            connection, reused = await self._acquire()
            response = connection.begin(head_only=method == "HEAD")
            try:
                await self._send(connection, method, path, headers, body, length)
                await response._wait_head()
                return response
            except UpstreamError as exc:
                connection.abort()
                unsent = isinstance(exc, _WriteFailed)
                harmless = method in IDEMPOTENT_METHODS and not response.received_anything
                if not (reused and may_retry and (unsent or harmless)):
                    raise
                may_retry = False
            except BaseException:
                connection.abort()  # cancelled (a timeout, a client gone): the exchange can't be finished
                raise

    async def _send(
        self,
        connection: _Connection,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        length: int | None,
    ) -> None:
        lines = [f"{method} {self.base_path}{path} HTTP/1.1", *self._fixed_headers]
        lines += [f"{name}: {value}" for name, value in headers]
        if isinstance(body, bytes | bytearray):
            lines.append(f"Content-Length: {len(body)}")
        elif body is not None:
            lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if body is None or isinstance(body, bytes | bytearray):
            await connection.write(head + body if body else head)
            return
        await connection.write(head)
        chunked = length is None
        async for piece in body:
            if piece:
                await connection.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            await connection.write(b"0\r\n\r\n")

    async def _acquire(self) -> tuple[_Connection, bool]:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to have gone stale
            if connection.usable() and now - connection.idle_since < IDLE_CONNECTION_SECONDS:
                return connection, True
            self._forget(connection)
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port, ssl=self.ssl
                )
        except TimeoutError:
            raise UpstreamError(f"no connection within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise UpstreamError(exc.strerror or str(exc) or type(exc).__name__) from None
        self._open.add(connection)
        return connection

    def _give_back(self, connection: _Connection) -> None:
        connection.idle_since = connection.loop.time()
        self._idle.append(connection)
        # Close connections nobody has wanted for a while, oldest first, so idle sockets don't pile up.
        while self._idle and connection.idle_since - self._idle[0].idle_since > IDLE_CONNECTION_SECONDS:
            self._forget(self._idle.popleft())

    def _forget(self, connection: _Connection) -> None:
        connection.abort()
        self._open.discard(connection)

    def close(self) -> None:
        for connection in list(self._open):
            connection.abort()
        self._open.clear()
        self._idle.clear()

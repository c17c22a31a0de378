"""A small HTTP/1.1 client for the gateway's one upstream: keep-alive pool, streaming in both directions.

Why not aiohttp or httpx: a relay spends its life reading small chunks from Ollama and writing them on.
Measured on this project's machines, aiohttp's response reader costs 23 us of CPU per chunk, this one 10 us
(httptools' C parser with a plain asyncio protocol); httpx is slower still (encode/httpx#3215). With 400
streams of 50 tokens a second that difference is a third of the gateway's CPU. See README, "Performance".

What it does, and no more: one origin (http or https), requests with a bytes body or a streamed one, responses
framed by Content-Length, chunked encoding or connection close, reading paused when a slow client lets data
pile up (so backpressure reaches Ollama), and closing a connection at once when asked (Ollama stops
generating when its client goes away).

Its timeouts are phases of one exchange: connecting; sending the request, where only a write that Ollama
leaves unread for `write_timeout` fails (a many-GB blob may take as long as the client takes to send it);
and waiting for the answer, which `first_byte_timeout` times from the end of the upload. An answer that comes
while the request is still being sent (Ollama refusing a body it has not read) ends the upload and is the
response. Anything that is not one plain HTTP/1.1 response (a 101 protocol switch, a head over
MAX_HEAD_BYTES, a transfer coding other than chunked, a second response) is an `UpstreamProtocolError`.
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
# At most this many idle connections are kept: after a burst of streams the rest are closed, oldest first,
# so sockets (and Ollama's goroutines) don't outlive the burst. A burst's next round mostly reuses them.
MAX_IDLE_CONNECTIONS = 256
# A response head (status line, headers, and any 1xx interim heads before it) larger than this, or with
# more headers than that, is refused: Ollama sends a handful, and httptools would buffer any amount.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
_HEAD_TOO_LARGE = f"Ollama's response headers are over {MAX_HEAD_BYTES // 1024} KiB"


class UpstreamError(Exception):
    """The upstream connection failed, or Ollama answered something that isn't HTTP."""


class _WriteFailed(UpstreamError):
    """The request could not be sent: Ollama cannot have acted on it."""


class UpstreamProtocolError(UpstreamError):
    """Ollama's answer is not one HTTP/1.1 response the gateway can relay."""


class UpstreamTimeout(UpstreamError):
    """Ollama took too long; never retried, since it may be working on the request."""


class FirstByteTimeout(UpstreamTimeout):
    """The whole request was sent and no answer began within the first-byte timeout."""


class WriteTimeout(UpstreamTimeout):
    """Ollama read nothing of the request for the write timeout."""


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
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
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
        # The transport closes its socket in the loop's next round, and failing the reader wakes its task in
        # that round too: abort first, so that the socket closes before the reader's task runs whatever ends
        # the request (its usage record, its log line), not after.
        self._connection.abort()
        self._fail(UpstreamError("closed by the gateway"))

    def release(self) -> None:
        """Hand the connection back for reuse if this response was read to its end, else drop it."""
        if self._complete and not self._chunks and self._error is None:
            self._connection.finished()
        else:
            self.close()

    # Called by the connection and the pool.

    @property
    def _answered(self) -> bool:
        """The head has arrived (the exchange did not fail before it)."""
        return self._head.done() and not self._head.cancelled() and self._head.exception() is None

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


def _delimited_by_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the body runs until the connection closes (no length, no chunking). Raises for a transfer
    coding other than chunked: the gateway would relay compressed bytes as they were the body."""
    has_length = False
    codings: list[bytes] = []
    for name, value in headers:
        name = name.lower()
        if name == b"content-length":
            has_length = True
        elif name == b"transfer-encoding":
            codings += [coding.strip().lower() for coding in value.split(b",")]
    if codings and codings != [b"chunked"]:
        named = b", ".join(codings).decode("latin-1")
        raise UpstreamProtocolError(f"Ollama sent Transfer-Encoding: {named}, which the gateway can't decode")
    return not has_length and not codings


class _Connection(asyncio.Protocol):
    def __init__(self, pool: "ConnectionPool") -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.lost = False
        self.keep_alive = False
        # False while the request is going out, and for good if the answer came before it was all sent:
        # Ollama may not have read the rest, so nothing more can follow on this connection.
        self.request_sent = False
        self.idle = False  # in the pool's idle list
        self.idle_since = 0.0
        # Until the final response head is complete, bytes received are counted against MAX_HEAD_BYTES.
        self.reading_head = False
        self.head_budget = MAX_HEAD_BYTES
        self.header_budget = MAX_HEAD_BYTES
        self._reading_paused = False
        self._writing_paused = False
        self._writer: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response, parser = self.response, self.parser
        if response is None or parser is None or response._complete:
            self.abort()  # bytes nobody asked for: the connection can't be trusted any more
            return
        if self.reading_head:
            self._head_data_received(response, parser, data)
            return
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)

    def _head_data_received(
        self, response: UpstreamResponse, parser: httptools.HttpResponseParser, data: bytes
    ) -> None:
        """`data_received` until the head is complete: the same, plus the head's size cap. Kept apart so
        that the body's path (every chunk of every stream) does no more work than it did."""
        response.received_anything = True
        self.head_budget -= len(data)
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)
            return
        # Past the budget with the head complete, the excess was body; with it still incomplete, head.
        if self.reading_head and self.head_budget < 0:
            self._protocol_error(UpstreamProtocolError(_HEAD_TOO_LARGE))

    def _parse_failed(self, exc: Exception) -> None:
        cause = exc.__context__  # what a callback of ours raised, if that is what stopped the parser
        if isinstance(cause, UpstreamError):
            self._protocol_error(cause)
        elif isinstance(exc, httptools.HttpParserUpgrade):
            self._protocol_error(UpstreamProtocolError("Ollama switched protocols (101)"))
        else:
            self._protocol_error(UpstreamProtocolError(f"Ollama sent an invalid HTTP response ({exc})"))

    def _protocol_error(self, error: UpstreamError) -> None:
        if self.response is not None:
            self.response._fail(error)
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool._lost(self)
        if self.response is not None:
            self.response._connection_lost()
        self._wake_writer(_WriteFailed("the connection to Ollama was lost while sending"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # httptools callbacks. An UpstreamError raised here stops the parser; `_parse_failed` reports it.

    def on_status(self, status: bytes) -> None:
        response = self.response
        if response is None or response._head.done():
            return  # a second response: on_headers_complete refuses it
        # Each head counts, interim ones too: "HTTP/1.1 100 ", its reason, CRLF, and the blank line's CRLF.
        self.header_budget -= len(status) + 17
        if self.header_budget < 0:
            raise UpstreamProtocolError(_HEAD_TOO_LARGE)
        response.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        if response is None or response._head.done():
            return  # a trailer, after the body: the head has been relayed already
        if len(response.headers) >= MAX_HEADERS:
            raise UpstreamProtocolError(f"Ollama sent more than {MAX_HEADERS} response headers")
        # Bytes received count only while the head is incomplete; this counts a head that completed within
        # the same read as its excess.
        self.header_budget -= len(name) + len(value) + 4  # with ": " and CRLF
        if self.header_budget < 0:
            raise UpstreamProtocolError(_HEAD_TOO_LARGE)
        response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response, parser = self.response, self.parser
        assert response is not None and parser is not None
        if response._head.done():
            # A second response to one request (or one pipelined behind it): never merge it into the first.
            raise UpstreamProtocolError("Ollama sent more than one response to one request")
        status = parser.get_status_code()
        if status == 101:
            # httptools would hand the connection over to another protocol (HttpParserUpgrade).
            raise UpstreamProtocolError("Ollama switched protocols (101), which a relay of HTTP can't follow")
        if not 100 <= status <= 599:
            raise UpstreamProtocolError(f"Ollama sent an invalid HTTP status ({status})")
        if status < 200:
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            response.headers.clear()
            return
        self.reading_head = False
        no_body = response.head_only or status in (204, 304)
        by_close = _delimited_by_close(response.headers)
        response._on_head(status, delimited_by_close=by_close and not no_body)
        self._wake_writer()  # answered while the request is still going out: stop sending it
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
        self.request_sent = False
        self.reading_head = True
        self.head_budget = self.header_budget = MAX_HEAD_BYTES
        self.response = UpstreamResponse(self, head_only)
        self.parser = httptools.HttpResponseParser(self)
        return self.response

    async def write(self, data: bytes | memoryview) -> None:
        """Hand `data` to the transport; if Ollama isn't reading, wait until it reads again, answers, or
        goes away, for at most the pool's write timeout."""
        if not self.usable() or self.transport is None:
            raise _WriteFailed("the connection to Ollama was lost before the request was sent")
        self.transport.write(data)
        if self._writing_paused:
            await self._until_writable()

    async def _until_writable(self) -> None:
        if self.response is not None and self.response._head.done():
            return
        self._writer = waiter = self.loop.create_future()
        timeout = self.pool.write_timeout
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise WriteTimeout(f"Ollama read nothing of the request for {timeout:g} s") from None
        finally:
            self._writer = None

    def _wake_writer(self, error: UpstreamError | None = None) -> None:
        waiter = self._writer
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)
            waiter.exception()  # consumed here: the writer still gets it

    def finished(self) -> None:
        self.response, self.parser = None, None
        if self.keep_alive and self.request_sent and self.usable():
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
    """Keep-alive connections to one origin. Any number may be in use (each open stream holds one for its
    life); at most `max_idle` are kept idle."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
        write_timeout: float,
        max_idle: int = MAX_IDLE_CONNECTIONS,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"OLLAMA_URL must be an http:// or https:// URL, not {base_url!r}")
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.base_path = url.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout
        self.write_timeout = write_timeout
        self.max_idle = max_idle
        host_header = f"[{url.host}]" if ":" in url.host else url.host
        if url.explicit_port:
            host_header += f":{url.port}"
        # The relay passes bodies through as they come and cuts NDJSON and SSE at line ends: it can't pass on
        # a compressed body it would have to cut, so it asks for none (a proxy may still compress).
        fixed = [f"Host: {host_header}", "Accept-Encoding: identity"]
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
        """Send a request and wait for the response head. Raises UpstreamError if that fails: a
        FirstByteTimeout if no answer began within `first_byte_timeout` of the request's end, a WriteTimeout
        if Ollama stopped reading the request.

        A reused connection may turn out to have been closed by Ollama (a restart, say). The request then goes
        once more on a fresh connection, but only when that can't make Ollama do the work twice: the request
        could not be written at all, or it is a GET or HEAD and nothing of the answer had arrived. A streamed
        body can't be replayed and is never retried; nor is a request that timed out."""
        head = self._request_head(method, path, headers, body, length)
        may_retry = not isinstance(body, AsyncIterable)
        while True:
            connection, reused = await self._acquire()
            response = connection.begin(head_only=method == "HEAD")
            try:
                await self._send(connection, response, head, body, length)
                await self._wait_head(response)
                return response
            except UpstreamTimeout:
                connection.abort()
                raise
            except UpstreamError as exc:
                connection.abort()
                unsent = isinstance(exc, _WriteFailed)
                harmless = method in IDEMPOTENT_METHODS and not response.received_anything
                if not (reused and may_retry and (unsent or harmless)):
                    raise
                may_retry = False
            except BaseException:
                connection.abort()  # cancelled (a client gone), or the body failed: the exchange can't finish
                raise

    def _request_head(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        length: int | None,
    ) -> bytes:
        lines = [f"{method} {self.base_path}{path} HTTP/1.1", *self._fixed_headers]
        lines += [f"{name}: {value}" for name, value in headers]
        if isinstance(body, bytes | bytearray):
            lines.append(f"Content-Length: {len(body)}")
        elif body is not None:
            lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send(
        self,
        connection: _Connection,
        response: UpstreamResponse,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        length: int | None,
    ) -> None:
        """Send the request, or as much of it as Ollama takes before it answers."""
        try:
            if body is None or isinstance(body, bytes | bytearray):
                await connection.write(head + body if body else head)
            else:
                await self._upload(connection, response, head, body, chunked=length is None)
        except _WriteFailed:
            # Ollama may answer and close without reading the rest (a 413, say): its answer is what counts.
            if not response._answered:
                raise
        connection.request_sent = not response._head.done()

    async def _upload(
        self,
        connection: _Connection,
        response: UpstreamResponse,
        head: bytes,
        body: AsyncIterable[bytes],
        chunked: bool,
    ) -> None:
        """Stream the body, until it ends or Ollama answers. The body comes at the client's pace: an answer
        must not wait for the client's next piece, so the upload runs beside the wait for the answer."""
        sending = asyncio.get_running_loop().create_task(
            self._write_body(connection, response, head, body, chunked)
        )
        try:
            await asyncio.wait((sending, response._head), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            sending.cancel()
            raise
        if not sending.done():  # the head came first, or the exchange failed: the rest is not wanted
            sending.cancel()
            await asyncio.wait((sending,))
            if not sending.cancelled():
                sending.exception()  # it ended on its own meanwhile; the answer is what counts
            return
        sending.result()

    @staticmethod
    async def _write_body(
        connection: _Connection,
        response: UpstreamResponse,
        head: bytes,
        body: AsyncIterable[bytes],
        chunked: bool,
    ) -> None:
        await connection.write(head)
        async for piece in body:
            if response._head.done():
                return  # answered, or failed: nothing more is wanted
            if piece:
                await connection.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            await connection.write(b"0\r\n\r\n")

    async def _wait_head(self, response: UpstreamResponse) -> None:
        """Wait for the answer to begin, timed from the end of the upload."""
        if not response._head.done():
            try:
                async with asyncio.timeout(self.first_byte_timeout):
                    await response._head
            except TimeoutError:
                raise FirstByteTimeout(f"no answer within {self.first_byte_timeout:g} s") from None
        response._head.result()

    async def _acquire(self) -> tuple[_Connection, bool]:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to have gone stale
            connection.idle = False
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
        connection.idle = True
        self._idle.append(connection)
        # Close connections nobody has wanted for a while, and those past the cap, oldest first.
        while self._idle and (
            len(self._idle) > self.max_idle
            or connection.idle_since - self._idle[0].idle_since > IDLE_CONNECTION_SECONDS
        ):
            self._forget(self._idle.popleft())

    def _forget(self, connection: _Connection) -> None:
        connection.idle = False
        connection.abort()
        self._open.discard(connection)

    def _lost(self, connection: _Connection) -> None:
        """A connection closed (by either side): it no longer counts as open, nor as idle."""
        self._open.discard(connection)
        if connection.idle:
            connection.idle = False
            self._idle.remove(connection)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def retire(self) -> None:
        """Keep no connection for later: the idle ones are closed now, the ones in use as their answers end.
        Nothing running is cut (a host removed from the fleet while streams run on it)."""
        self.max_idle = 0
        while self._idle:
            self._forget(self._idle.popleft())

    def close(self) -> None:
        for connection in self._idle:
            connection.idle = False  # its connection_lost, called later, must not look for it in `_idle`
        self._idle.clear()
        for connection in list(self._open):
            connection.abort()
        self._open.clear()

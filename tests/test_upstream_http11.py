"""The gateway's HTTP/1.1 client (`upstream.http11`) byte by byte, in the spirit of httpcore's tests: a peer
on loopback writes exact bytes, and each case checks what a user of the gateway would notice: the body they
get, an error instead of a wrong answer, a connection reused or not (a reused one that was not clean would
hand the next person someone else's answer)."""

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import uvloop

from tests.scripted_upstream import ScriptedUpstream, answer_each, linger_then_close, read_head_only
from upstream.http11 import (
    MAX_HEAD_BYTES,
    ConnectionPool,
    FirstByteTimeout,
    UpstreamError,
    UpstreamProtocolError,
    WriteTimeout,
)

T = TypeVar("T")
BOUND = 10.0  # no exchange in these tests may take longer than this
PEER_TIMEOUT = 10.0  # nor may a peer's script wait longer than this on its socket


def run(make: Callable[[], Awaitable[T]]) -> T:
    """Run on uvloop, the loop the gateway serves with."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_bounded(make))


async def _bounded(make: Callable[[], Awaitable[T]]) -> T:
    async with asyncio.timeout(BOUND):
        return await make()


def make_pool(url: str, **overrides: float) -> ConnectionPool:
    settings = {"connect_timeout": 2.0, "first_byte_timeout": 2.0, "write_timeout": 2.0} | overrides
    max_idle = int(settings.pop("max_idle", 16))
    return ConnectionPool(url, max_idle=max_idle, **settings)


@dataclass
class Outcome:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""  # what failed, if the exchange did
    error_type: type[UpstreamError] | None = None


async def exchange(pool: ConnectionPool, method: str = "GET", body: bytes | None = None) -> Outcome:
    """One request, its body read whole and the response released, as the relay does."""
    outcome = Outcome()
    try:
        response = await pool.request(method, "/api/tags", [], body)
    except UpstreamError as exc:
        outcome.error, outcome.error_type = str(exc), type(exc)
        return outcome
    outcome.status = response.status
    outcome.headers = {name.lower(): value for name, value in response.headers}
    try:
        while chunk := await response.read_chunk():
            outcome.body += chunk
    except UpstreamError as exc:
        outcome.error, outcome.error_type = str(exc), type(exc)
    finally:
        response.release()
    return outcome


def two_exchanges(
    reply: bytes, *, method: str = "GET", close_after: bool = False
) -> tuple[list[Outcome], int]:
    """The same exact reply to two requests in turn; and how many connections the peer saw."""
    with ScriptedUpstream(answer_each(reply, close_after=close_after), timeout=PEER_TIMEOUT) as peer:

        async def both() -> list[Outcome]:
            pool = make_pool(peer.url)
            try:
                return [await exchange(pool, method), await exchange(pool, method)]
            finally:
                pool.close()

        outcomes = run(both)
    return outcomes, peer.connections


def head(status_line: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([status_line, *headers]) + b"\r\n\r\n"


OK_2 = head(b"HTTP/1.1 200 OK", b"Content-Length: 2") + b"ok"

# (reply, method, the body the client gets, whether the connection serves the next request too). The peer
# keeps every connection open unless the framing needs it closed: whether to reuse is the client's decision.
FRAMINGS = [
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Content-Type: application/json", b"Content-Length: 13") + b'{"models":[]}',
        "GET",
        b'{"models":[]}',
        True,
        id="content-length",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        "GET",
        b"hello world",
        True,
        id="chunked",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"Trailer: X-Checksum")
        + b'5;name="ext"\r\nhello\r\n6;x\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n',
        "GET",
        b"hello world",
        True,
        id="chunked-with-extensions-and-trailers",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Content-Type: text/plain") + b"until the connection closes",
        "GET",
        b"until the connection closes",
        False,
        id="close-delimited",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Content-Length: 1234"), "HEAD", b"", True, id="head-promises-a-length"
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"), "HEAD", b"", True, id="head-promises-chunks"
    ),
    pytest.param(head(b"HTTP/1.1 204 No Content"), "DELETE", b"", True, id="204"),
    pytest.param(
        head(b"HTTP/1.1 304 Not Modified", b'ETag: "v1"', b"Content-Length: 10"), "GET", b"", True, id="304"
    ),
    pytest.param(
        head(b"HTTP/1.1 100 Continue")
        + head(b"HTTP/1.1 103 Early Hints", b"Link: </style.css>; rel=preload")
        + OK_2,
        "POST",
        b"ok",
        True,
        id="100-and-103-before-the-answer",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Connection: close") + b"ok",
        "GET",
        b"ok",
        False,
        id="connection-close",
    ),
    pytest.param(head(b"HTTP/1.0 200 OK", b"Content-Length: 2") + b"ok", "GET", b"ok", False, id="http-1.0"),
    pytest.param(
        head(b"HTTP/1.0 200 OK", b"Content-Length: 2", b"Connection: keep-alive") + b"ok",
        "GET",
        b"ok",
        True,
        id="http-1.0-keep-alive",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Content-Length: 2")
        + b"okHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra",
        "GET",
        b"ok",
        False,
        id="a-second-unsolicited-response",
    ),
]


@pytest.mark.parametrize(("reply", "method", "body", "reused"), FRAMINGS)
def test_http11_framing(
    request: pytest.FixtureRequest, reply: bytes, method: str, body: bytes, reused: bool
) -> None:
    delimited_by_close = request.node.callspec.id == "close-delimited"
    outcomes, connections = two_exchanges(reply, method=method, close_after=delimited_by_close)
    for outcome in outcomes:
        assert outcome.error == ""
        assert outcome.body == body  # each request gets its own answer, never bytes of another
    assert connections == (1 if reused else 2)


def test_http11_interim_and_trailer_headers_are_not_the_answers_headers() -> None:
    reply = (
        head(b"HTTP/1.1 103 Early Hints", b"Link: </style.css>; rel=preload")
        + head(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Transfer-Encoding: chunked")
        + b"2\r\nok\r\n0\r\nX-Checksum: 42\r\n\r\n"
    )
    [outcome, _], _ = two_exchanges(reply)
    assert outcome.status == 200
    assert set(outcome.headers) == {b"content-type", b"transfer-encoding"}


# (reply, what the error says): each must fail the request rather than hand on a wrong answer.
REFUSED = [
    pytest.param(
        head(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade"),
        "switched protocols (101)",
        id="101-upgrade",
    ),
    pytest.param(head(b"HTTP/1.1 101 Switching Protocols"), "switched protocols (101)", id="101-bare"),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Content-Length: 3") + b"ok",
        "Duplicate Content-Length",
        id="conflicting-content-length",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Content-Length: 2", b"Content-Length: 2") + b"ok",
        "Duplicate Content-Length",
        id="duplicate-content-length",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Content-Length: 2, 2") + b"ok",
        "Content-Length",
        id="content-length-list",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Transfer-Encoding: chunked")
        + b"2\r\nok\r\n0\r\n\r\n",
        "Transfer-Encoding can't be present with Content-Length",
        id="content-length-and-transfer-encoding",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip") + b"\x1f\x8b\x08\x00",
        "Transfer-Encoding: gzip",
        id="transfer-coding-other-than-chunked",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n",
        "Transfer-Encoding: gzip, chunked",
        id="compressed-then-chunked",
    ),
    pytest.param(head(b"HTTP/1.1 OK"), "invalid HTTP response", id="status-line-without-a-code"),
    pytest.param(head(b"HTTP/1.1 600 Beyond"), "invalid HTTP status (600)", id="status-above-599"),
    pytest.param(head(b"HTTP/1.1 099 Below"), "invalid HTTP status (99)", id="status-below-100"),
    pytest.param(head(b"HTTP/2 200 OK"), "invalid HTTP response", id="not-http-1"),
    pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "invalid HTTP response", id="not-http"),
    pytest.param(
        head(b"HTTP/1.1 200 OK", *(b"X-Filler-%d: %s" % (n, b"x" * 1000) for n in range(70))),
        f"over {MAX_HEAD_BYTES // 1024} KiB",
        id="headers-over-64-kib",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", b"X-Huge: " + b"x" * (MAX_HEAD_BYTES + 1)),
        f"over {MAX_HEAD_BYTES // 1024} KiB",
        id="one-header-over-64-kib",
    ),
    pytest.param(
        head(b"HTTP/1.1 100 Continue") * 6000 + OK_2,
        f"over {MAX_HEAD_BYTES // 1024} KiB",
        id="endless-interim-responses",
    ),
    pytest.param(
        head(b"HTTP/1.1 200 OK", *(b"X-%d: 1" % n for n in range(101))),
        "more than 100 response headers",
        id="more-than-100-headers",
    ),
]


@pytest.mark.parametrize(("reply", "error"), REFUSED)
def test_http11_refuses_what_is_not_one_plain_response(reply: bytes, error: str) -> None:
    outcomes, connections = two_exchanges(reply)
    for outcome in outcomes:
        assert outcome.status == 0
        assert outcome.error_type is UpstreamProtocolError
        assert error in outcome.error
    assert connections == 2  # a connection that carried nonsense is never used again


@pytest.mark.parametrize(
    ("reply", "delivered"),
    [
        pytest.param(
            head(b"HTTP/1.1 200 OK", b"Content-Length: 100") + b"partial", b"partial", id="content-length"
        ),
        pytest.param(
            head(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked") + b"7\r\npartial\r\n5\r\nhe",
            b"partialhe",
            id="chunked",
        ),
    ],
)
def test_http11_a_truncated_body_is_an_error_not_a_short_body(reply: bytes, delivered: bytes) -> None:
    outcomes, connections = two_exchanges(reply, close_after=True)
    for outcome in outcomes:
        assert outcome.status == 200
        assert outcome.body == delivered
        assert "lost" in outcome.error  # the relay sees it was cut short and tells its client
    assert connections == 2


def test_http11_bytes_after_the_response_on_an_idle_connection_drop_it() -> None:
    """A peer that writes an unsolicited response while the connection sits in the pool: the next request
    must not take it for its answer."""

    def answer_then_babble(sock: socket.socket, peer: ScriptedUpstream) -> None:
        if peer.read(sock) is not None:
            sock.sendall(OK_2)
            time.sleep(0.1)
            sock.sendall(head(b"HTTP/1.1 200 OK", b"Content-Length: 6") + b"stolen")
            peer.read(sock)

    with ScriptedUpstream(answer_then_babble, timeout=PEER_TIMEOUT) as peer:

        async def twice() -> list[Outcome]:
            pool = make_pool(peer.url)
            try:
                first = await exchange(pool)
                await asyncio.sleep(0.3)
                return [first, await exchange(pool)]
            finally:
                pool.close()

        outcomes = run(twice)
    assert [outcome.body for outcome in outcomes] == [b"ok", b"ok"]
    assert peer.connections == 2


# Retry rules: a reused connection the peer closed may be retried only when Ollama cannot have acted twice.


def _answer_once_then_drop(partial: bytes) -> Callable[[socket.socket, ScriptedUpstream], None]:
    """Answer the first request; read the next and hang up, after sending `partial` of an answer."""

    def script(sock: socket.socket, peer: ScriptedUpstream) -> None:
        if peer.read(sock) is None:
            return
        sock.sendall(OK_2)
        if peer.read(sock) is not None and partial:
            sock.sendall(partial)

    return script


async def _slow_pieces() -> AsyncIterator[bytes]:
    yield b"stream"
    yield b"ed"


def _no_body() -> None:
    return None


def _json_body() -> bytes:
    return b"{}"


@pytest.mark.parametrize(
    ("method", "body", "partial", "retried"),
    [
        pytest.param("GET", _no_body, b"", True, id="get-nothing-received"),
        pytest.param("HEAD", _no_body, b"", True, id="head-nothing-received"),
        pytest.param(
            "GET", _no_body, b"HTTP/1.1 200 OK\r\nContent-", False, id="get-part-of-an-answer-received"
        ),
        pytest.param("POST", _json_body, b"", False, id="post-received"),
        pytest.param("POST", _slow_pieces, b"", False, id="streamed-body"),
    ],
)
def test_http11_a_reused_connection_closed_by_the_peer(
    method: str, body: Callable[[], bytes | AsyncIterator[bytes] | None], partial: bytes, retried: bool
) -> None:
    with ScriptedUpstream(_answer_once_then_drop(partial), timeout=PEER_TIMEOUT) as peer:

        async def twice() -> Outcome:
            pool = make_pool(peer.url)
            try:
                assert (await exchange(pool)).body == b"ok"
                try:
                    response = await pool.request(method, "/x", [], body())
                except UpstreamError as exc:
                    return Outcome(error=str(exc))
                response.release()
                return Outcome(status=response.status)
            finally:
                pool.close()

        outcome = run(twice)
    if retried:
        assert outcome.status == 200
        assert len(peer.heads) == 3  # sent again, once, on a fresh connection
    else:
        assert "lost" in outcome.error  # Ollama may have acted on it: never sent twice
        assert len(peer.heads) == 2


def test_http11_a_dead_idle_connection_is_not_used() -> None:
    def answer_then_close(sock: socket.socket, peer: ScriptedUpstream) -> None:
        if peer.read(sock) is not None:
            sock.sendall(OK_2)  # keep-alive promised, then the peer restarts

    with ScriptedUpstream(answer_then_close, timeout=PEER_TIMEOUT) as peer:

        async def twice() -> list[Outcome]:
            pool = make_pool(peer.url)
            try:
                first = await exchange(pool, "POST", b"{}")
                await asyncio.sleep(0.2)
                return [first, await exchange(pool, "POST", b"{}")]
            finally:
                pool.close()

        outcomes = run(twice)
    assert [outcome.body for outcome in outcomes] == [b"ok", b"ok"]
    assert peer.connections == 2


# The upload, and the answer that may come before it ends.

ERROR_413 = head(
    b"HTTP/1.1 413 Request Entity Too Large", b"Content-Type: application/json", b"Content-Length: 21"
) + (b'{"error":"too large"}')


async def _many_pieces(count: int, size: int, pause: float = 0.0) -> AsyncIterator[bytes]:
    piece = b"x" * size
    for _ in range(count):
        if pause:
            await asyncio.sleep(pause)
        yield piece


def _answer_early(*, then_close: bool) -> Callable[[socket.socket, ScriptedUpstream], None]:
    """Answer 413 on seeing the request's head, without reading its body; then close, or just stop reading."""

    def script(sock: socket.socket, peer: ScriptedUpstream) -> None:
        peer.heads.append(read_head_only(sock))
        sock.sendall(ERROR_413)
        if then_close:
            linger_then_close(sock)
        else:
            time.sleep(3)

    return script


@pytest.mark.parametrize("then_close", [True, False], ids=["then-closes", "then-stops-reading"])
@pytest.mark.parametrize("body_kind", ["bytes", "streamed", "streamed-slowly"])
def test_http11_an_answer_before_the_upload_ends_is_the_response(then_close: bool, body_kind: str) -> None:
    with ScriptedUpstream(
        _answer_early(then_close=then_close), receive_buffer=4096, timeout=PEER_TIMEOUT
    ) as peer:

        async def upload() -> tuple[Outcome, float]:
            pool = make_pool(peer.url, first_byte_timeout=5.0, write_timeout=5.0)
            if body_kind == "bytes":
                body: bytes | AsyncIterator[bytes] = b"x" * (32 * 1024 * 1024)
            elif body_kind == "streamed":
                body = _many_pieces(512, 64 * 1024)
            else:
                body = _many_pieces(100, 1024, pause=0.1)  # a client sending its body over 10 s
            started = time.monotonic()
            try:
                response = await pool.request("POST", "/api/blobs/sha256:00", [], body)
                outcome = Outcome(status=response.status, body=await response.read(1024))
                response.release()
                return outcome, time.monotonic() - started
            finally:
                pool.close()

        outcome, elapsed = run(upload)
    assert outcome.status == 413
    assert outcome.body == b'{"error":"too large"}'
    assert elapsed < 3.0  # neither the write timeout nor the client's pace held the answer back


def test_http11_after_an_early_answer_the_connection_is_not_reused() -> None:
    """Ollama answered without reading the body and kept the connection: what it left unread would be taken
    for the next request."""
    with ScriptedUpstream(_answer_early(then_close=False), receive_buffer=4096, timeout=PEER_TIMEOUT) as peer:

        async def twice() -> list[int]:
            pool = make_pool(peer.url)
            statuses = []
            try:
                for _ in range(2):
                    response = await pool.request("POST", "/x", [], _many_pieces(256, 64 * 1024))
                    await response.read(1024)
                    response.release()
                    statuses.append(response.status)
                return statuses
            finally:
                pool.close()

        assert run(twice) == [413, 413]
    assert peer.connections == 2


def test_http11_the_first_byte_timeout_runs_from_the_end_of_the_upload() -> None:
    def read_all_then_answer(sock: socket.socket, peer: ScriptedUpstream) -> None:
        if peer.read(sock) is not None:
            time.sleep(0.2)
            sock.sendall(head(b"HTTP/1.1 201 Created", b"Content-Length: 0"))

    with ScriptedUpstream(read_all_then_answer, timeout=PEER_TIMEOUT) as peer:

        async def upload() -> int:
            pool = make_pool(peer.url, first_byte_timeout=0.5)
            try:
                # 1.2 s of upload, longer than the first-byte timeout, then 0.2 s to answer: within it.
                response = await pool.request("POST", "/api/blobs/sha256:00", [], _many_pieces(6, 1024, 0.2))
                response.release()
                return response.status
            finally:
                pool.close()

        assert run(upload) == 201
    assert peer.bodies == [b"x" * 6 * 1024]


def test_http11_no_answer_after_the_upload_is_a_first_byte_timeout() -> None:
    def read_then_stay_silent(sock: socket.socket, peer: ScriptedUpstream) -> None:
        if peer.read(sock) is not None:
            time.sleep(3)

    uploaded: list[float] = []

    async def pieces_then_note_the_end() -> AsyncIterator[bytes]:
        async for piece in _many_pieces(3, 1024, 0.2):
            yield piece
        uploaded.append(time.monotonic())

    with ScriptedUpstream(read_then_stay_silent, timeout=PEER_TIMEOUT) as peer:

        async def upload() -> float:
            pool = make_pool(peer.url, first_byte_timeout=0.3)
            try:
                with pytest.raises(FirstByteTimeout):
                    await pool.request("POST", "/x", [], pieces_then_note_the_end())
                return time.monotonic() - uploaded[0]
            finally:
                pool.close()

        after_upload = run(upload)
    assert 0.25 < after_upload < 1.5


@pytest.mark.parametrize("body_kind", ["bytes", "streamed"])
def test_http11_an_upload_ollama_stops_reading_is_a_write_timeout(body_kind: str) -> None:
    def read_head_then_stall(sock: socket.socket, peer: ScriptedUpstream) -> None:
        peer.heads.append(read_head_only(sock))
        time.sleep(3)

    with ScriptedUpstream(read_head_then_stall, receive_buffer=4096, timeout=PEER_TIMEOUT) as peer:

        async def upload() -> tuple[str, float]:
            pool = make_pool(peer.url, first_byte_timeout=30.0, write_timeout=0.3)
            body: bytes | AsyncIterator[bytes] = (
                b"x" * (64 * 1024 * 1024) if body_kind == "bytes" else _many_pieces(1024, 64 * 1024)
            )
            started = time.monotonic()
            try:
                await pool.request("POST", "/api/blobs/sha256:00", [], body)
            except WriteTimeout as exc:
                return str(exc), time.monotonic() - started
            finally:
                pool.close()
            return "answered", 0.0

        error, elapsed = run(upload)
    assert "read nothing of the request" in error
    assert elapsed < 3.0


def test_http11_the_pool_keeps_at_most_max_idle_connections() -> None:
    all_in = threading.Barrier(4, timeout=PEER_TIMEOUT)

    def answer_when_all_four_are_open(sock: socket.socket, peer: ScriptedUpstream) -> None:
        if peer.read(sock) is None:
            return
        all_in.wait()  # four requests at once: four connections
        sock.sendall(OK_2)
        peer.read(sock)  # then wait, idle, until the pool closes this connection (or the test ends)

    with ScriptedUpstream(answer_when_all_four_are_open, timeout=PEER_TIMEOUT) as peer:

        async def burst() -> tuple[int, int]:
            pool = make_pool(peer.url, max_idle=2)
            try:
                outcomes = await asyncio.gather(*(exchange(pool) for _ in range(4)))
                assert [outcome.body for outcome in outcomes] == [b"ok"] * 4
                idle = pool.idle_connections
                return idle, await asyncio.to_thread(peer.wait_closed_by_peer, 2, 5.0)
            finally:
                pool.close()

        idle, closed = run(burst)
    assert idle == 2
    assert closed == 2  # the two beyond the cap were closed as soon as they were released
    assert peer.connections == 4


def test_http11_closing_the_pool_with_idle_connections_raises_nothing_later() -> None:
    # The gateway closes its pool at shutdown, usually with kept-alive connections in it; their
    # connection_lost comes a moment later and must find the pool's books already in order.
    errors: list[dict] = []
    with ScriptedUpstream(answer_each(OK_2), timeout=PEER_TIMEOUT) as peer:

        async def close_with_an_idle_connection() -> int:
            asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
            pool = make_pool(peer.url)
            assert (await exchange(pool)).body == b"ok"
            idle = pool.idle_connections
            pool.close()
            await asyncio.sleep(0.1)  # connection_lost runs
            return idle

        idle = run(close_with_an_idle_connection)
    assert idle == 1
    assert errors == []

"""Upstream problems must surface as the gateway's own, never as the client's (issue 9, item 6).

A gateway in front of an upstream scripted below HTTP (`ScriptedUpstream`): Ollama, or a proxy in front of
it, refusing the gateway's credentials, redirecting, setting headers on the gateway's origin, compressing,
switching protocols, answering during an upload or reading it slowly. Each test says what the client sees.
"""

import contextlib
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.rawhttp import RawResponse, open_post, read_response
from tests.scripted_upstream import ScriptedUpstream, linger_then_close, read_head_only
from tests.servers import RunningGateway, gateway_settings, start_gateway
from tests.streams import chat_body

PEER_TIMEOUT = 10.0
DIGEST = "sha256:" + "ab" * 32
BLOB_PATH = f"/api/blobs/{DIGEST}"
NDJSON_LINE = b'{"message":{"role":"assistant","content":"hi"},"done":true}\n'
SSE_EVENTS = b'data: {"choices":[]}\n\ndata: [DONE]\n\n'

Script = Callable[[socket.socket, ScriptedUpstream], None]
Setup = tuple[RunningGateway, ScriptedUpstream]
Answering = Callable[[bytes], Setup]  # the shared gateway, its upstream answering these bytes from now on
Starting = Callable[..., Setup]  # a gateway of its own, in front of an upstream running a script


def reply(status: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_message(response: httpx.Response | RawResponse) -> str:
    """The message of the gateway's error, in either surface's shape."""
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


# What a client sends on each surface, and how (the JSON model lists are read by the gateway itself).
SURFACES = [
    pytest.param("POST", "/chat", chat_body(), id="chat"),
    pytest.param("POST", "/api/chat", chat_body(), id="api-chat"),
    pytest.param("POST", "/v1/chat/completions", chat_body() | {"stream": True}, id="openai-chat"),
    pytest.param("GET", "/api/version", None, id="api-version"),
    pytest.param("GET", "/api/tags", None, id="model-list"),
    pytest.param("GET", "/v1/models", None, id="openai-model-list"),
]


def call(
    gateway: RunningGateway, method: str, path: str, body: dict | None, **headers: str
) -> httpx.Response:
    return httpx.request(
        method,
        gateway.url + path,
        json=body,
        headers=gateway.admin_headers() | headers,
        timeout=30,
        follow_redirects=False,
    )


class Replies:
    """An upstream whose every request gets `reply`, exact bytes, set by each test."""

    def __init__(self) -> None:
        self.reply = b""

    def script(self, sock: socket.socket, upstream: ScriptedUpstream) -> None:
        while upstream.read(sock) is not None:
            sock.sendall(self.reply)


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningGateway, ScriptedUpstream, Replies]]:
    """One gateway in front of one scripted upstream, for the tests that need no settings of their own."""
    replies = Replies()
    with ScriptedUpstream(replies.script, timeout=PEER_TIMEOUT) as upstream:
        gateway, server = start_gateway(gateway_settings(tmp_path_factory.mktemp("faults"), upstream.url))
        try:
            yield gateway, upstream, replies
        finally:
            server.stop()


@pytest.fixture
def upstream_answering(shared: tuple[RunningGateway, ScriptedUpstream, Replies]) -> Answering:
    """`upstream_answering(reply)`: the shared gateway, its upstream answering `reply` from now on."""

    def answering(reply: bytes) -> Setup:
        gateway, upstream, replies = shared
        replies.reply = reply
        upstream.heads.clear()
        return gateway, upstream

    return answering


@pytest.fixture
def gateway_before(make_gateway: Callable[..., RunningGateway]) -> Iterator[Starting]:
    """A gateway with its own settings in front of an upstream that runs `script` on every connection."""
    upstreams: list[ScriptedUpstream] = []

    def start(script: Script, receive_buffer: int | None = None, **settings: float) -> Setup:
        upstream = ScriptedUpstream(script, timeout=PEER_TIMEOUT, receive_buffer=receive_buffer)
        upstream.__enter__()
        upstreams.append(upstream)
        return make_gateway(ollama_url=upstream.url, **settings), upstream

    yield start
    for upstream in upstreams:
        upstream.__exit__()


# Credentials refused upstream: the gateway's problem, not the client's token.


@pytest.mark.parametrize("status", ["401 Unauthorized", "403 Forbidden", "407 Proxy Authentication Required"])
@pytest.mark.parametrize(("method", "path", "body"), SURFACES)
def test_upstream_refusing_the_gateways_credentials_is_502(
    upstream_answering: Answering, status: str, method: str, path: str, body: dict | None
) -> None:
    refusal = reply(
        status,
        'WWW-Authenticate: Basic realm="ollama"',
        'Proxy-Authenticate: Basic realm="proxy"',
        "Content-Type: application/json",
        body=b'{"error":"unauthorized"}',
    )
    gateway, _ = upstream_answering(refusal)
    response = call(gateway, method, path, body)
    # A 401 would tell the client its own token is bad: the web page would sign its user out, in a loop.
    assert response.status_code == 502
    assert "refused the gateway's credentials" in error_message(response)
    assert "www-authenticate" not in response.headers
    assert "proxy-authenticate" not in response.headers


def test_the_clients_own_bad_token_is_still_401(upstream_answering: Answering) -> None:
    gateway, upstream = upstream_answering(reply("200 OK", body=b"{}"))
    response = httpx.get(gateway.url + "/api/tags", headers={"Authorization": "Bearer nonsense"})
    assert response.status_code == 401
    assert upstream.heads == []


@pytest.mark.parametrize(
    "status",
    [
        "301 Moved Permanently",
        "302 Found",
        "303 See Other",
        "307 Temporary Redirect",
        "308 Permanent Redirect",
    ],
)
@pytest.mark.parametrize(("method", "path", "body"), SURFACES)
def test_an_upstream_redirect_is_502_never_relayed(
    upstream_answering: Answering, status: str, method: str, path: str, body: dict | None
) -> None:
    # A proxy sending clients to its login page, or Ollama's address that only the gateway can reach.
    redirect = reply(
        status, "Location: https://sso.internal.example/login?next=/api/chat", "Set-Cookie: sso=1"
    )
    gateway, _ = upstream_answering(redirect)
    response = call(gateway, method, path, body)
    assert response.status_code == 502
    assert "redirect" in error_message(response)
    assert "location" not in response.headers
    assert "set-cookie" not in response.headers


# Response headers: an allow-list.

ORIGIN_HEADERS = [
    "Set-Cookie: session=upstream; Path=/",
    "Clear-Site-Data: *",
    'WWW-Authenticate: Basic realm="ollama"',
    "Strict-Transport-Security: max-age=31536000; includeSubDomains",
    'Alt-Svc: h3=":443"; ma=86400',
    "Access-Control-Allow-Origin: *",
    "Access-Control-Allow-Credentials: true",
    "Content-Security-Policy: default-src *",
    "Refresh: 0; url=https://evil.example/",
    "Link: <https://evil.example/app.js>; rel=preload; as=script",
    "Location: https://evil.example/",
    "Server: ollama-internal/1.2",
    "X-Powered-By: internal",
]


@pytest.mark.parametrize(
    ("path", "body", "content_type", "payload"),
    [
        pytest.param("/chat", chat_body(), "application/x-ndjson", NDJSON_LINE, id="ndjson-stream"),
        pytest.param(
            "/v1/chat/completions",
            chat_body() | {"stream": True},
            "text/event-stream",
            SSE_EVENTS,
            id="event-stream",
        ),
        pytest.param("/chat", chat_body() | {"stream": False}, "application/json", NDJSON_LINE, id="json"),
    ],
)
def test_only_allow_listed_upstream_headers_reach_the_client(
    upstream_answering: Answering, path: str, body: dict, content_type: str, payload: bytes
) -> None:
    gateway, _ = upstream_answering(
        reply("200 OK", f"Content-Type: {content_type}", *ORIGIN_HEADERS, body=payload)
    )
    response = call(gateway, "POST", path, body)
    assert response.status_code == 200
    assert response.content == payload
    assert response.headers["content-type"] == content_type  # what Ollama sends and clients need is kept
    for header in ORIGIN_HEADERS:
        name, _, value = header.partition(": ")
        assert value not in response.headers.get_list(name), f"{header} reached the client"


# Compression: ask for none; refuse what can't be relayed line by line.


def test_the_clients_accept_encoding_is_not_passed_to_ollama(upstream_answering: Answering) -> None:
    gateway, upstream = upstream_answering(
        reply("200 OK", "Content-Type: application/x-ndjson", body=NDJSON_LINE)
    )
    response = call(gateway, "POST", "/chat", chat_body(), **{"Accept-Encoding": "gzip, br, zstd"})
    assert response.status_code == 200
    header_lines = upstream.heads[0].decode("latin-1").lower().split("\r\n")[1:]
    assert [line for line in header_lines if line.startswith("accept-encoding:")] == [
        "accept-encoding: identity"
    ]


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "payload"),
    [
        pytest.param("POST", "/chat", chat_body(), "application/x-ndjson", NDJSON_LINE, id="ndjson-stream"),
        pytest.param(
            "POST",
            "/v1/chat/completions",
            chat_body() | {"stream": True},
            "text/event-stream",
            SSE_EVENTS,
            id="event-stream",
        ),
        pytest.param("GET", "/api/tags", None, "application/json", b'{"models":[]}', id="model-list"),
        pytest.param("GET", "/v1/models", None, "application/json", b'{"data":[]}', id="openai-model-list"),
    ],
)
def test_a_compressed_stream_or_model_list_is_a_clear_502(
    upstream_answering: Answering,
    method: str,
    path: str,
    body: dict | None,
    content_type: str,
    payload: bytes,
) -> None:
    compressed = reply(
        "200 OK", f"Content-Type: {content_type}", "Content-Encoding: gzip", body=gzip.compress(payload)
    )
    gateway, _ = upstream_answering(compressed)
    response = call(gateway, method, path, body)
    assert response.status_code == 502
    assert "compressed (gzip)" in error_message(response)


def test_a_compressed_one_piece_answer_is_relayed_with_its_encoding(upstream_answering: Answering) -> None:
    answer = {"message": {"role": "assistant", "content": "hi"}, "done": True}
    compressed = reply(
        "200 OK",
        "Content-Type: application/json",
        "Content-Encoding: gzip",
        body=gzip.compress(json.dumps(answer).encode()),
    )
    gateway, _ = upstream_answering(compressed)
    response = call(gateway, "POST", "/chat", chat_body() | {"stream": False})
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.json() == answer  # httpx decoded it, as any client would


def test_content_encoding_identity_is_no_compression(upstream_answering: Answering) -> None:
    answer = reply(
        "200 OK", "Content-Type: application/x-ndjson", "Content-Encoding: identity", body=NDJSON_LINE
    )
    gateway, _ = upstream_answering(answer)
    response = call(gateway, "POST", "/chat", chat_body())
    assert response.status_code == 200
    assert response.content == NDJSON_LINE


# What is not one plain HTTP/1.1 response.


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "switched protocols (101)",
            id="101",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"X-Filler-%d: %s\r\n" % (n, b"x" * 1000) for n in range(70))
            + b"\r\n",
            "headers are over 64 KiB",
            id="headers-over-64-kib",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"X-%d: 1\r\n" % n for n in range(101))
            + b"Content-Length: 0\r\n\r\n",
            "more than 100 response headers",
            id="more-than-100-headers",
        ),
    ],
)
def test_an_answer_that_is_not_plain_http_is_a_clear_502(
    upstream_answering: Answering, answer: bytes, message: str
) -> None:
    gateway, _ = upstream_answering(answer)
    response = call(gateway, "POST", "/chat", chat_body())
    assert response.status_code == 502
    assert message in error_message(response)


# Uploads: the first-byte timeout runs from the end of the upload; a stalled upload has its own bound; an
# answer during the upload is Ollama's own.


def test_a_blob_upload_longer_than_the_first_byte_timeout_is_not_a_504(gateway_before: Starting) -> None:
    def read_all_then_create(sock: socket.socket, upstream: ScriptedUpstream) -> None:
        if upstream.read(sock) is not None:
            sock.sendall(reply("201 Created"))

    gateway, upstream = gateway_before(read_all_then_create, upstream_first_byte_timeout=0.5)

    def slow_blob() -> Iterator[bytes]:
        for _ in range(5):
            time.sleep(0.3)  # 1.5 s of upload: three times the first-byte timeout
            yield b"x" * 1024

    response = httpx.post(
        gateway.url + BLOB_PATH, content=slow_blob(), headers=gateway.admin_headers(), timeout=30
    )
    assert response.status_code == 201
    assert upstream.bodies == [b"x" * 5 * 1024]


def _upload(gateway: RunningGateway, size: int) -> tuple[RawResponse, float]:
    """POST a blob of `size` bytes, sent in the background; the answer as soon as it comes."""
    sock = open_post(
        gateway.url, BLOB_PATH, gateway.admin_headers() | {"Content-Length": str(size), "Connection": "close"}
    )
    piece = b"x" * (256 * 1024)

    def send() -> None:
        try:
            for _ in range(size // len(piece)):
                sock.sendall(piece)
        except OSError:
            pass  # the gateway answered and stopped reading, as it may

    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    sender.start()
    try:
        response = read_response(sock)
        return response, time.monotonic() - started
    finally:
        with contextlib.suppress(OSError):  # the gateway may have closed it already
            sock.shutdown(socket.SHUT_RDWR)  # wakes the sender if it is blocked
        sender.join(timeout=PEER_TIMEOUT)
        sock.close()


def test_an_upload_ollama_stops_reading_is_504_after_the_idle_timeout(gateway_before: Starting) -> None:
    def read_the_head_then_stall(sock: socket.socket, upstream: ScriptedUpstream) -> None:
        upstream.heads.append(read_head_only(sock))
        time.sleep(5)

    gateway, _ = gateway_before(
        read_the_head_then_stall,
        receive_buffer=4096,
        upstream_idle_timeout=0.5,
        upstream_first_byte_timeout=8.0,
    )
    response, elapsed = _upload(gateway, 256 * 1024 * 1024)
    assert response.status_code == 504
    assert "stopped reading the request" in error_message(response)
    assert elapsed < 4.0  # the idle timeout's bound, not the first-byte timeout's


@pytest.mark.parametrize("then_close", [True, False], ids=["then-closes", "then-stops-reading"])
@pytest.mark.parametrize(
    ("status", "body", "expected_status", "expected_message"),
    [
        pytest.param("400 Bad Request", b'{"error":"digest mismatch"}', 400, "digest mismatch", id="400"),
        pytest.param("413 Request Entity Too Large", b'{"error":"too large"}', 413, "too large", id="413"),
        pytest.param("403 Forbidden", b"", 502, "refused the gateway's credentials", id="403"),
    ],
)
def test_an_answer_during_the_upload_is_ollamas_own(
    gateway_before: Starting,
    then_close: bool,
    status: str,
    body: bytes,
    expected_status: int,
    expected_message: str,
) -> None:
    def answer_before_reading_the_body(sock: socket.socket, upstream: ScriptedUpstream) -> None:
        upstream.heads.append(read_head_only(sock))
        sock.sendall(reply(status, "Content-Type: application/json", body=body))
        if then_close:
            linger_then_close(sock)
        else:
            time.sleep(5)  # the connection stays open, the body unread

    gateway, _ = gateway_before(
        answer_before_reading_the_body, receive_buffer=4096, upstream_first_byte_timeout=8.0
    )
    response, elapsed = _upload(gateway, 256 * 1024 * 1024)
    assert response.status_code == expected_status
    assert expected_message in error_message(response)
    assert elapsed < 4.0  # not held until the first-byte timeout

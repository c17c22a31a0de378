"""Clients that misbehave: hostile paths, slow readers, silent or trickling connections, crowds of idle
sockets, oversized and malformed bodies on every route. None of them may hurt the gateway or anyone else."""

import itertools
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psutil
import pytest

from core.server import raise_open_file_limit
from core.settings import MIB, Settings
from main import create_app
from tests import rawhttp
from tests.processes import running_main
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import add_user
from tests.streams import chat_body, read_stream
from tests.test_upstream_client import DONE_LINE, chunked_ndjson


def _answer_each_request(sock, upstream):
    while upstream.read(sock) is not None:
        sock.sendall(chunked_ndjson([DONE_LINE]))


def test_relay_path_with_encoded_crlf_cannot_smuggle_a_request_to_ollama(make_gateway):
    # Decoded into the request line, %0D%0A would end it and start headers, then a second request.
    raw_path = "/v1/models/x%20HTTP/1.1%0D%0AHost:%20a%0D%0A%0D%0ADELETE%20/api/delete%20HTTP/1.1"
    with ScriptedUpstream(_answer_each_request) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        token = add_user(gateway, "mallory@example.com")  # not an admin: may not delete models
        response = rawhttp.get(gateway.url, raw_path, {"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    request_line, *header_lines = upstream.heads[0].decode("latin-1").split("\r\n")
    assert request_line == f"GET {raw_path} HTTP/1.1"
    assert "Host: a" not in header_lines


# Against `python main.py` itself, as `make run` serves: its HTTP protocol, its limits, its memory.

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE_SECONDS = 5  # uvicorn's default `timeout_keep_alive`, which `python main.py` keeps
ADMIN_PASSWORD = "abuse-test-password"


@dataclass
class MainProcess:
    url: str
    pid: int
    token: str

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)


@pytest.fixture(scope="module")
def main_process(fake_ollama_server, tmp_path_factory) -> Iterator[MainProcess]:
    folder = tmp_path_factory.mktemp("main")
    settings = {
        "OLLAMA_URL": fake_ollama_server.url,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "REQUEST_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "REQUEST_BODY_TIMEOUT": str(BODY_TIMEOUT),
    }
    with running_main(folder, **settings) as (url, _, pid):
        login = {"email": "admin@local", "password": ADMIN_PASSWORD}
        token = httpx.post(f"{url}/login", json=login).json()["access_token"]
        yield MainProcess(url, pid, token)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (or raises)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - started


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(main_process):
    with main_process.connect() as sock:
        received, elapsed = _closed_within(sock, HEADER_TIMEOUT + 5)
    assert received == b""
    assert elapsed < HEADER_TIMEOUT + 1


def test_headers_sent_a_byte_at_a_time_are_answered_408_at_the_header_timeout(main_process):
    head = b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Padding: " + b"a" * 1000
    started = time.monotonic()
    with main_process.connect() as sock:
        for byte in head:
            if select.select([sock], [], [], 0.05)[0] or time.monotonic() - started > HEADER_TIMEOUT + 5:
                break
            sock.sendall(bytes([byte]))
        received, _ = _closed_within(sock, 5)
    elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 ")
    assert b"request head" in received
    assert elapsed < HEADER_TIMEOUT + 1.5


def test_a_slow_client_whose_head_arrives_in_time_is_served(main_process):
    head = b"GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"
    with main_process.connect() as sock:
        for byte in head:
            sock.sendall(bytes([byte]))
            time.sleep(HEADER_TIMEOUT * 0.6 / len(head))
        received, _ = _closed_within(sock, 5)
    assert received.startswith(b"HTTP/1.1 200 ")


def test_a_stream_longer_than_the_header_timeout_is_not_cut(main_process, ollama):
    headers = {"Authorization": f"Bearer {main_process.token}"}
    body = chat_body(tokens=3, interval=HEADER_TIMEOUT / 2)
    with httpx.Client(base_url=main_process.url, headers=headers, timeout=30) as http:
        stream = read_stream(http, "/chat", body)
    assert stream.lines[-1]["done"] is True


def test_an_idle_kept_alive_connection_is_closed_after_uvicorns_keep_alive_timeout(main_process):
    with main_process.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
        response = rawhttp.read_response(sock)
        assert response.status_code == 200
        received, elapsed = _closed_within(sock, KEEP_ALIVE_SECONDS + 5)
    assert received == b""
    assert elapsed < KEEP_ALIVE_SECONDS + 1.5


def test_a_client_reading_slowly_holds_ollama_back_not_gateway_memory(main_process, ollama):
    total = 1_000_000  # about 120 MB of NDJSON, as fast as the fake can write it
    body = json.dumps(chat_body(tokens=total, interval=0)).encode()
    process = psutil.Process(main_process.pid)
    before = process.memory_info().rss
    peak, sent = before, [0]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with sock:
        sock.connect(main_process.address)
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (main_process.token.encode(), len(body), body)
        )
        deadline = time.monotonic() + 10
        # Read a few bytes a few times a second until Ollama has written nothing for a second.
        while len(sent) < STALLED_SAMPLES or len(set(sent[-STALLED_SAMPLES:])) > 1:
            assert time.monotonic() < deadline, f"Ollama kept writing to a client that reads nothing: {sent}"
            sock.recv(16)
            time.sleep(0.2)
            peak = max(peak, process.memory_info().rss)
            sent.append(ollama.streams[-1].lines_sent if ollama.streams else 0)
    record = ollama.wait_for_stream_end(timeout=5)
    assert record.lines_sent < total / 10
    assert peak - before < 10 * MIB, f"the gateway grew by {(peak - before) / MIB:.1f} MB"
    assert record.client_gone_at is not None  # and once the client left, Ollama was told


STALLED_SAMPLES = 6  # samples 0.2 s apart: a second without a line written


IDLE_CONNECTIONS = 1000


def test_1000_idle_connections_leave_the_gateway_serving_others(tmp_path, ollama):
    # Many systems start processes with a soft limit of 1024 open files; here, even fewer.
    raise_open_file_limit()  # this test's own 1000 sockets
    settings = {"OLLAMA_URL": ollama.url, "ADMIN_PASSWORD": ADMIN_PASSWORD, "REQUEST_HEADER_TIMEOUT": "60"}
    with running_main(tmp_path, open_files=256, **settings) as (url, _, pid):
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(IDLE_CONNECTIONS)]
        try:
            process = psutil.Process(pid)
            deadline = time.monotonic() + 10
            while len(process.net_connections()) < IDLE_CONNECTIONS and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(process.net_connections()) >= IDLE_CONNECTIONS, "the gateway stopped accepting"
            login = {"email": "admin@local", "password": ADMIN_PASSWORD}
            token = httpx.post(f"{url}/login", json=login, timeout=10).json()["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
                stream = read_stream(http, "/chat", chat_body(tokens=5, interval=0.01))
                assert http.get("/health").json()["ollama_reachable"] is True
        finally:
            for sock in idle:
                sock.close()
    assert stream.lines[-1]["done"] is True


# Request bodies: read only once the credentials are known good, and only so fast, so slow.


def _post_head(main_process: MainProcess, path: str, length: int, token: str | None = None) -> socket.socket:
    sock = main_process.connect()
    auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: gateway\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (path.encode(), auth, length)
    )
    return sock


def _trickle_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Send a byte every 0.1 s, reading what comes back, until the server closes the connection."""
    started, received = time.monotonic(), b""
    while time.monotonic() - started < limit:
        if select.select([sock], [], [], 0.1)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return received, time.monotonic() - started
            received += chunk
        else:
            try:
                sock.sendall(b" ")
            except OSError:  # reset: closed with the byte unread
                return received, time.monotonic() - started
    raise AssertionError(f"still open after {limit} s; received {received[:200]!r}")


@pytest.mark.parametrize("path", ["/keys", "/me/password", "/admin/users", "/upload", "/api/chat", "/chat"])
def test_an_anonymous_body_is_answered_401_before_a_byte_of_it_is_read(main_process, path):
    with _post_head(main_process, path, 10 * MIB) as sock:  # the body is never sent
        sock.settimeout(2)
        response = rawhttp.read_response(sock)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_body_trickled_a_byte_at_a_time_is_answered_408_and_its_connection_closed(main_process):
    with _post_head(main_process, "/login", 10_000) as sock:
        received, elapsed = _trickle_until_closed(sock, BODY_TIMEOUT + 10)
    assert received.startswith(b"HTTP/1.1 408 ")
    assert b"did not arrive in time" in received
    # Answered after the body timeout; closed once the rest of the body had had the same allowance again.
    assert elapsed < 2 * BODY_TIMEOUT + 2


def test_a_body_trickled_after_an_early_answer_does_not_hold_the_connection(main_process):
    with _post_head(main_process, "/api/chat", 10 * MIB) as sock:
        received, elapsed = _trickle_until_closed(sock, BODY_TIMEOUT + 10)
    assert received.startswith(b"HTTP/1.1 401 ")
    assert elapsed < BODY_TIMEOUT + 2


def test_a_large_body_sent_at_a_steady_pace_outlasts_the_body_timeout(main_process, ollama):
    text = "x" * (256 * 1024)
    body = json.dumps(chat_body(text=text) | {"stream": False}).encode()
    piece = 32 * 1024  # every 0.5 s: 64 KB/s, well above the 16 KB/s floor
    with _post_head(main_process, "/chat", len(body), main_process.token) as sock:
        started = time.monotonic()
        for offset in range(0, len(body), piece):
            sock.sendall(body[offset : offset + piece])
            time.sleep(0.5)
        sock.settimeout(10)
        received = rawhttp.receive_until(sock, b'"done":true')
    assert time.monotonic() - started > 3 * BODY_TIMEOUT
    assert received.startswith(b"HTTP/1.1 200 "), received[:300]


def test_a_body_sent_fast_cannot_bank_time_to_stall_before_its_end(main_process):
    with _post_head(main_process, "/chat", 3 * MIB, main_process.token) as sock:
        sock.sendall(b" " * (2 * MIB))  # earns two minutes at the 16 KB/s floor, if credit could pile up
        started = time.monotonic()
        sock.settimeout(BODY_TIMEOUT + 10)
        received = rawhttp.receive_until(sock, b"\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 408 "), received[:200]
    assert time.monotonic() - started < BODY_TIMEOUT + 2


@pytest.mark.parametrize(
    ("path", "size", "expected"),
    [("/login", 20 * 1024, 413), ("/keys", 8 * 1024, 413), ("/admin/users", 100 * 1024, 413)],
)
def test_routes_that_take_small_json_refuse_big_bodies_even_when_chunked(gateway, path, size, expected):
    headers = gateway.admin_headers() | {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    body = b'{"padding": "' + b"x" * size + b'"}'
    with rawhttp.open_post(gateway.url, path, headers) as sock:
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        response = rawhttp.read_response(sock)
    assert response.status_code == expected
    assert "too large" in response.json()["error"]


def test_a_login_body_cut_short_is_not_logged_as_a_server_error(gateway, caplog):
    with rawhttp.open_post(
        gateway.url, "/login", {"Content-Type": "application/json", "Content-Length": "100"}
    ) as sock:
        sock.sendall(b'{"email": "a')
    with httpx.Client(base_url=gateway.url) as http:  # the gateway is still serving, and said nothing
        assert http.get("/health").status_code == 200
    time.sleep(0.2)
    assert [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")] == []


def test_a_huge_body_of_tiny_values_does_not_stall_other_streams(gateway, client, ollama):
    # 40 MB of empty objects: parsing it whole would hold the event loop for about a second (and take GBs).
    body = b'{"model": "llama3.2:1b", "messages": [' + b"{}," * 13_000_000 + b'{}], "stream": false}'
    gaps: list[float] = []
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=60) as streaming:

        def stream() -> None:
            stream = read_stream(streaming, "/chat", chat_body(tokens=300, interval=0.01))
            gaps.extend(later - earlier for earlier, later in itertools.pairwise(stream.arrived_at))

        worker = threading.Thread(target=stream)
        worker.start()
        time.sleep(0.3)
        refused = client.post("/chat", content=body, headers={"Content-Type": "application/json"}, timeout=60)
        worker.join(timeout=60)
    assert refused.status_code == 400
    assert "too many JSON values" in refused.json()["error"]
    assert max(gaps) < 0.5, f"the stream stalled for {max(gaps):.2f} s"


# Every route in the OpenAPI description, refusing bodies it cannot use with a 4xx, never a 500.

_SPEC = create_app(Settings(_env_file=None)).openapi()
_PATH_VALUES = {
    "user_id": "999999",  # no such user or key: nothing is changed or removed
    "key_id": "999999",
    "host_id": "h999999",
    "filename": "0" * 32 + "_nothing.txt",
    "digest": "sha256:" + "0" * 64,
    "model": "llama3.2:1b",
}
ROUTES = [
    pytest.param(
        method.upper(), path.format(**_PATH_VALUES), "requestBody" in operation, id=f"{method} {path}"
    )
    for path, operations in _SPEC["paths"].items()
    for method, operation in operations.items()
]
# Blobs of any size stream through to Ollama, never held (test_native_api.py checks the gateway's memory).
CAPPED_ROUTES = [route for route in ROUTES if not str(route.values[1]).startswith("/api/blobs/")]
MALFORMED_BODIES = {
    "empty": b"",
    "not-json": b"{not json",
    "a-json-list": b"[1, 2]",
    "a-json-string": b'"hello"',
    "wrong-types": b'{"model": 7, "messages": "x", "email": [], "password": {}, "name": null}',
    "not-utf8": b"\xff\xfe\x00{",
    "deeply-nested": b"[" * 100_000,
}


@pytest.mark.parametrize(("method", "path", "takes_body"), ROUTES)
def test_every_route_answers_a_malformed_body_with_4xx_never_500(client, ollama, method, path, takes_body):
    for name, body in MALFORMED_BODIES.items():
        response = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code < 500, f"{name}: {response.status_code} {response.text}"
        if takes_body:
            assert 400 <= response.status_code < 500, f"{name}: {response.status_code} {response.text}"
        if response.status_code >= 400 and method != "HEAD":
            assert "error" in response.json(), name


@pytest.mark.parametrize(("method", "path", "takes_body"), CAPPED_ROUTES)
def test_every_route_refuses_a_declared_oversized_body_with_413(gateway, method, path, takes_body):
    headers = gateway.admin_headers() | {"Content-Type": "application/json", "Content-Length": str(10**12)}
    with rawhttp.open_request(gateway.url, method, path, headers) as sock:  # not a byte of the body is sent
        status = rawhttp.read_status(sock)
    assert status == 413


# Text that JSON allows and nothing can store: a lone surrogate escape.

LONE = "\\ud800"  # as written in JSON text


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        pytest.param(
            "/login", f'{{"email": "x@example.com{LONE}", "password": "abcdefgh"}}', id="login-email"
        ),
        pytest.param(
            "/login", f'{{"email": "a@example.com", "password": "{LONE}abcdefgh"}}', id="login-password"
        ),
        pytest.param(
            "/me/password", f'{{"current_password": "x{LONE}", "new_password": "abcdefgh-xyz"}}', id="current"
        ),
        pytest.param(
            "/me/password", f'{{"current_password": "abcdefgh", "new_password": "{LONE}abcdefgh"}}', id="new"
        ),
        pytest.param("/admin/users", f'{{"email": "n{LONE}@x.com", "password": "abcdefgh-xyz"}}', id="email"),
        pytest.param(
            "/admin/users", f'{{"email": "n@x.com", "password": "{LONE}abcdefgh-9"}}', id="password"
        ),
        pytest.param(
            "/admin/users",
            f'{{"email": "m@x.com", "password": "abcdefgh-xyz", "models": ["{LONE}"]}}',
            id="models",
        ),
        pytest.param("/keys", f'{{"name": "{LONE}"}}', id="key-name"),
    ],
)
def test_a_lone_surrogate_is_refused_as_the_clients_error_never_a_500(client, caplog, path, raw):
    response = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert "error" in response.json()
    assert [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")] == []

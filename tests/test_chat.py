"""POST /chat: a faithful, unbuffered relay of Ollama's /api/chat."""

import base64
import itertools
import json
import os
import time

import httpx
import pytest

from tests.streams import chat_body, read_stream


def test_stream_arrives_line_by_line_while_the_model_is_still_generating(client, ollama):
    interval = 0.2
    with client.stream("POST", "/chat", json=chat_body(tokens=5, interval=interval)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = response.iter_lines()
        first = json.loads(next(lines))
        first_seen = time.monotonic()
        # The first token is in our hands while Ollama has four more to go.
        assert not ollama.streams[-1].finished
        rest = [(json.loads(line), time.monotonic()) for line in lines]
    assert first["message"]["content"] == "Hello"
    arrivals = [first_seen] + [seen for _, seen in rest]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap > interval * 0.5 for gap in gaps), gaps
    assert rest[-1][0]["done"] is True


def test_stream_is_relayed_unchanged_and_complete(client, ollama):
    stream = read_stream(client, "/chat", chat_body(tokens=8, interval=0.0))
    assert stream.status == 200
    assert len(stream.lines) == 9
    assert stream.lines[-1]["done"] is True
    assert stream.lines[-1]["done_reason"] == "stop"
    assert stream.text == "Hello, world!Hello, world!"
    assert stream.headers["x-accel-buffering"] == "no"


def test_stream_false_returns_one_json_object(client, ollama):
    body = chat_body(tokens=4) | {"stream": False}
    response = client.post("/chat", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert answer["done"] is True
    assert answer["message"]["content"] == "Hello, world!"


def test_the_body_reaches_ollama_byte_for_byte(client, ollama):
    image = base64.b64encode(os.urandom(6 * 1024 * 1024)).decode()
    body = {
        "model": "llava:7b",
        "messages": [{"role": "user", "content": "What is in this picture?", "images": [image]}],
        "stream": False,
        "format": "json",
        "keep_alive": "5m",
        "think": False,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "options": {"temperature": 0.1, "fake_echo": True},
    }
    raw = json.dumps(body).encode()
    response = client.post("/chat", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    assert response.json()["message"]["content"] == "What is in this picture?"
    assert ollama.requests[-1].body == raw


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b'"hello"', id="a-string"),
        pytest.param(b"[1, 2]", id="a-list"),
        pytest.param(b'{"messages": []}', id="no-model"),
        pytest.param(b'{"model": 7, "messages": []}', id="model-not-a-string"),
        pytest.param(b'{"model": "", "messages": []}', id="empty-model"),
        pytest.param(b'{"model": "llama3.2:1b"}', id="no-messages"),
        pytest.param(b'{"model": "llama3.2:1b", "messages": "hi"}', id="messages-not-a-list"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
    ],
)
def test_a_body_ollama_could_not_use_is_400_json(client, ollama, raw):
    response = client.post("/chat", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert not ollama.requests, "nothing should have been sent to Ollama"


def test_unknown_model_passes_through_as_ollama_404(client, ollama):
    response = client.post("/chat", json=chat_body(model="llama9:70b"))
    assert response.status_code == 404
    assert response.json() == {"error": "model 'llama9:70b' not found"}


def test_ollama_busy_passes_through_as_503(client, ollama):
    ollama.set_busy(True)
    response = client.post("/chat", json=chat_body())
    assert response.status_code == 503
    assert "server busy" in response.json()["error"]


def test_an_error_mid_stream_is_the_last_line(client, ollama):
    stream = read_stream(client, "/chat", chat_body(tokens=10, interval=0.0, error_after=3))
    assert stream.status == 200
    assert [line["message"]["content"] for line in stream.lines[:3]] == ["Hello", ",", " world"]
    assert stream.lines[-1] == {"error": "an error was encountered while running the model: unexpected EOF"}
    assert not any(line.get("done") for line in stream.lines)


def test_ollama_dying_mid_stream_ends_the_stream_with_an_error_line(client, ollama):
    stream = read_stream(client, "/chat", chat_body(tokens=10, interval=0.01, reset_after=2))
    assert stream.status == 200
    assert len(stream.lines) == 3
    assert stream.lines[-1] == {"error": "the connection to Ollama was lost mid-stream"}


def test_a_stream_that_goes_silent_ends_with_an_idle_timeout_error(make_gateway, ollama):
    gateway = make_gateway(upstream_idle_timeout=0.5)
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
        started = time.monotonic()
        stream = read_stream(http, "/chat", chat_body(tokens=10, interval=0.01, hang_after=2))
        elapsed = time.monotonic() - started
    assert len(stream.lines) == 3
    assert "idle timeout" in stream.lines[-1]["error"]
    assert elapsed < 3
    assert ollama.wait_for_stream_end(timeout=2).client_gone_at is not None


def test_a_slow_model_load_is_waited_for(client, ollama):
    started = time.monotonic()
    stream = read_stream(client, "/chat", chat_body(load=1.5, tokens=2, interval=0.0))
    assert stream.status == 200
    assert stream.lines[-1]["done"] is True
    assert stream.arrived_at[0] - started >= 1.5


def test_no_first_byte_within_the_first_byte_timeout_is_504(make_gateway, ollama):
    gateway = make_gateway(upstream_first_byte_timeout=0.5)
    started = time.monotonic()
    response = httpx.post(f"{gateway.url}/chat", json=chat_body(load=5), headers=gateway.admin_headers())
    assert response.status_code == 504
    assert "first-byte timeout" in response.json()["error"]
    assert time.monotonic() - started < 3


def test_unreachable_ollama_is_502(make_gateway, unused_port):
    gateway = make_gateway(ollama_url=f"http://127.0.0.1:{unused_port}")
    response = httpx.post(f"{gateway.url}/chat", json=chat_body(), headers=gateway.admin_headers())
    assert response.status_code == 502
    assert "cannot reach Ollama" in response.json()["error"]


# The client going away mid-stream: tests/test_native_api.py, on /chat and every other streaming surface.


def test_credentials_and_hop_by_hop_headers_never_reach_ollama(client, ollama):
    response = client.post(
        "/chat",
        json=chat_body() | {"stream": False},
        headers={
            "Cookie": "session=secret-cookie",
            "Origin": "http://somewhere.example",
            "Connection": "keep-alive, X-Hop-Only",
            "X-Hop-Only": "1",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "X-Request-Id": "abc-123",
            "User-Agent": "ollama-python/0.6.3",
        },
    )
    assert response.status_code == 200
    sent = ollama.requests[-1].headers
    for name in ("authorization", "cookie", "origin", "x-hop-only", "proxy-authorization"):
        assert name not in sent, f"{name} was forwarded to Ollama"
    assert sent["host"] == ollama.host_header
    assert sent["x-request-id"] == "abc-123"
    assert sent["user-agent"] == "ollama-python/0.6.3"


def test_ollamas_own_400_passes_through_with_its_message(client, ollama):
    response = client.post("/chat", json=chat_body(tokens="many"))
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid fake_* option")


@pytest.mark.parametrize("path", ["/chat", "/login", "/api/chat"])
def test_deeply_nested_json_is_400_not_500(client, ollama, path):
    # 10,000 levels: deeper than Python's recursion limit, within even /login's body cap.
    response = client.post(path, content=b"[" * 10_000, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422)
    assert "error" in response.json()

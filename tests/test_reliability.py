"""Ollama misbehaving: every fault gives its client a clear error in its surface's shape, within the
configured timeouts, while another client's stream through the same gateway goes on untouched.

Already covered elsewhere and not repeated here: an Ollama that cannot be reached (test_chat.py,
test_unreachable_ollama_is_502), one that does not speak HTTP (test_upstream_client.py,
test_an_upstream_that_does_not_speak_http_is_502), a stream cut in the middle of a line
(test_a_stream_cut_mid_line_never_hands_the_client_half_a_line) and a client hanging up
(test_client_disconnect_closes_the_upstream_request).
"""

import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.fake_ollama import BUSY_MESSAGE
from tests.scripted_upstream import ScriptedUpstream
from tests.servers import gateway_settings, start_gateway
from tests.streams import chat_body

TIMEOUT = 0.5  # the gateway's first-byte and idle timeouts in these tests
# Time allowed on top of a timeout before its error reaches the client.
SLACK = 1.5
HEALTHY_TOKENS = 12
HEALTHY_INTERVAL = 0.08  # the healthy stream lasts about 1 s: it is mid-stream while each fault plays out


@dataclass
class Surface:
    path: str
    extra: dict = field(default_factory=dict)

    @property
    def is_openai(self) -> bool:
        return self.path.startswith("/v1/")

    def body(self, **options) -> dict:
        return chat_body(**options) | self.extra

    def events(self, text: str) -> list[dict]:
        """Every line (NDJSON) or every `data:` event (SSE) of a stream, parsed."""
        if not self.is_openai:
            return [json.loads(line) for line in text.splitlines()]
        data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        return [json.loads(item) for item in data if item != "[DONE]"]

    def error_message(self, answer: dict) -> str:
        """The message of an error in this surface's shape; fails if the shape is wrong."""
        if self.is_openai:
            assert set(answer) == {"error"}
            assert set(answer["error"]) == {"message", "type", "param", "code"}
            return answer["error"]["message"]
        assert set(answer) == {"error"}
        assert isinstance(answer["error"], str)
        return answer["error"]


SURFACES = [
    pytest.param(Surface("/chat"), id="ollama"),
    pytest.param(Surface("/v1/chat/completions", {"stream": True}), id="openai"),
]


class HealthyStream(threading.Thread):
    """Another client's stream through the same gateway, read line by line in the background."""

    def __init__(self, gateway) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.flowing = threading.Event()
        self.lines: list[dict] = []
        self.status = 0

    def run(self) -> None:
        body = chat_body(tokens=HEALTHY_TOKENS, interval=HEALTHY_INTERVAL)
        with (
            httpx.Client(base_url=self.gateway.url, headers=self.gateway.admin_headers(), timeout=30) as http,
            http.stream("POST", "/chat", json=body) as response,
        ):
            self.status = response.status_code
            for line in response.iter_lines():
                self.lines.append(json.loads(line))
                self.flowing.set()

    def __enter__(self) -> "HealthyStream":
        self.start()
        assert self.flowing.wait(10), "the healthy stream did not start"
        return self

    def __exit__(self, *exc_info) -> None:
        self.join(timeout=30)

    def assert_untouched(self) -> None:
        assert self.status == 200
        assert len(self.lines) == HEALTHY_TOKENS + 1
        assert all("error" not in line for line in self.lines)
        assert self.lines[-1]["done"] is True


@pytest.fixture(scope="module")
def strict_gateway(fake_ollama_server, tmp_path_factory):
    """One gateway with short upstream timeouts, shared by this module's tests."""
    settings = gateway_settings(
        tmp_path_factory.mktemp("strict"),
        fake_ollama_server.url,
        upstream_first_byte_timeout=TIMEOUT,
        upstream_idle_timeout=TIMEOUT,
    )
    gateway, server = start_gateway(settings)
    yield gateway
    server.stop()


def _post(gateway, surface: Surface, body: dict) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(gateway.url + surface.path, json=body, headers=gateway.admin_headers(), timeout=30)
    return response, time.monotonic() - started


@pytest.mark.parametrize("surface", SURFACES)
def test_ollama_reset_mid_stream_ends_the_stream_with_an_error_others_go_on(strict_gateway, ollama, surface):
    with HealthyStream(strict_gateway) as healthy:
        response, _ = _post(strict_gateway, surface, surface.body(tokens=10, reset_after=2))
    assert response.status_code == 200  # as in Ollama: an error after streaming began keeps status 200
    events = surface.events(response.text)
    assert "lost mid-stream" in surface.error_message(events[-1])
    assert len(events) == 3
    healthy.assert_untouched()


@pytest.mark.parametrize("surface", SURFACES)
def test_ollama_silent_before_the_first_byte_is_504_others_go_on(strict_gateway, ollama, surface):
    with HealthyStream(strict_gateway) as healthy:
        response, elapsed = _post(strict_gateway, surface, surface.body(load=30))
    assert response.status_code == 504
    assert "first-byte timeout" in surface.error_message(response.json())
    assert elapsed < TIMEOUT + SLACK
    healthy.assert_untouched()


@pytest.mark.parametrize("surface", SURFACES)
def test_ollama_silent_between_chunks_ends_the_stream_with_an_error_others_go_on(
    strict_gateway, ollama, surface
):
    with HealthyStream(strict_gateway) as healthy:
        response, elapsed = _post(strict_gateway, surface, surface.body(tokens=10, hang_after=2))
    assert response.status_code == 200
    events = surface.events(response.text)
    assert "idle timeout" in surface.error_message(events[-1])
    assert len(events) == 3
    assert elapsed < TIMEOUT + SLACK
    healthy.assert_untouched()


@pytest.mark.parametrize("surface", SURFACES)
def test_ollama_answering_garbage_is_502_others_go_on(strict_gateway, ollama, surface):
    with HealthyStream(strict_gateway) as healthy:
        response, _ = _post(strict_gateway, surface, surface.body(garbage=True))
    assert response.status_code == 502
    assert "not" in surface.error_message(response.json())
    healthy.assert_untouched()


@pytest.mark.parametrize("surface", SURFACES)
def test_ollama_busy_is_its_503_with_its_message_others_go_on(strict_gateway, ollama, surface):
    with HealthyStream(strict_gateway) as healthy:
        ollama.set_busy(True)  # every request from now on: the healthy stream was already accepted
        try:
            response, _ = _post(strict_gateway, surface, surface.body())
        finally:
            ollama.set_busy(False)
    assert response.status_code == 503
    assert surface.error_message(response.json()) == BUSY_MESSAGE
    healthy.assert_untouched()


def _event_stream_of(body: bytes):
    def answer(sock, upstream):
        upstream.read(sock)
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    return answer


def test_an_event_stream_that_is_not_server_sent_events_is_502(make_gateway):
    with ScriptedUpstream(_event_stream_of(b"<html>proxy error</html>\n")) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json=chat_body() | {"stream": True},
            headers=gateway.admin_headers(),
        )
    assert response.status_code == 502
    assert "event stream" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "first_event",
    [b"data: {}\n\n", b"event: response.created\ndata: {}\n\n", b": keep-alive\n\n", b"id: 1\ndata: {}\n\n"],
    ids=["data", "event", "comment", "id"],
)
def test_an_event_stream_that_opens_with_any_sse_field_is_relayed(make_gateway, first_event):
    with ScriptedUpstream(_event_stream_of(first_event + b"data: [DONE]\n\n")) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json=chat_body() | {"stream": True},
            headers=gateway.admin_headers(),
        )
    assert response.status_code == 200
    assert response.content == first_event + b"data: [DONE]\n\n"

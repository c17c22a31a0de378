"""The access log: one line per request once its answer has ended, with the request id (the client's when
sane, else a new one, and always in the answer), who asked, and for a model call what it used; never a
credential, a password or anything of a body."""

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from observe.access_log import AccessLog
from observe.request_log import request_log
from tests.processes import running_main
from tests.servers import RunningGateway, add_user
from tests.streams import chat_body
from usage.records import Outcome, UsageRecord

MADE_ID = re.compile(r"[0-9a-f]{32}")


class Lines(logging.Handler):
    """Every access line written while a test runs (from the gateway's own thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.lines.append(record.getMessage())
            self._changed.notify_all()

    def with_id(self, request_id: str, timeout: float = 5) -> list[str]:
        """The lines naming this request id, once there is one (a line is written just after the answer's
        last byte, so it may come a moment after the client has it all)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if request_id in line]
                if found or not self._changed.wait(max(deadline - time.monotonic(), 0)):
                    return found

    def settle(self, count: int, timeout: float = 5) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.lines) < count and self._changed.wait(max(deadline - time.monotonic(), 0)):
                pass
            return list(self.lines)


@pytest.fixture
def access_lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("gateway.access")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _fields(line: str) -> dict[str, str]:
    """A text line's key=value fields (values quoted as JSON strings where they need to be)."""
    fields = {}
    for match in re.finditer(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line):
        value = match.group(2)
        fields[match.group(1)] = json.loads(value) if value.startswith('"') else value
    return fields


def test_access_log_one_line_per_request_with_the_clients_request_id(gateway, client, access_lines):
    ids = [f"test-{n}.{time.monotonic_ns()}" for n in range(5)]
    for request_id in ids:
        response = client.get("/api/tags", headers={"X-Request-ID": request_id})
        assert response.status_code == 200
        assert response.headers["X-Request-ID"] == request_id
    for request_id in ids:
        [line] = access_lines.with_id(request_id)
        fields = _fields(line)
        assert fields["request_id"] == request_id
        assert fields["method"] == "GET"
        assert fields["path"] == "/api/tags"
        assert fields["status"] == "200"
        assert fields["client"] == "127.0.0.1"
        assert fields["surface"] == "/api/tags"
        assert fields["user_id"] != "-"
        assert float(fields["duration_seconds"]) >= 0


def test_access_log_request_id_made_when_the_client_sends_none(gateway, anonymous, access_lines):
    response = anonymous.get("/health")
    made = response.headers["X-Request-ID"]
    assert MADE_ID.fullmatch(made)
    [line] = access_lines.with_id(made)
    assert _fields(line)["user_id"] == "-"
    assert anonymous.get("/health").headers["X-Request-ID"] != made


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param("", id="empty"),
        pytest.param("a b", id="space"),
        pytest.param("x" * 129, id="too-long"),
        pytest.param('id"quote', id="quote"),
        pytest.param("id=forged status=200", id="fake-fields"),
        pytest.param("caf\xe9", id="not-ascii"),
    ],
)
def test_access_log_insane_request_id_is_replaced(gateway, anonymous, access_lines, sent):
    response = anonymous.get("/health", headers={"X-Request-ID": sent.encode("latin-1")})
    made = response.headers["X-Request-ID"]
    assert MADE_ID.fullmatch(made)
    [line] = access_lines.with_id(made)
    assert sent not in line or not sent


def test_access_log_json_lines_parse_with_every_field(make_gateway, access_lines):
    gateway = make_gateway(log_format="json")
    headers = {**gateway.admin_headers(), "X-Request-ID": "json-1"}
    response = httpx.get(f"{gateway.url}/api/tags?secret-query=1", headers=headers)
    assert response.status_code == 200
    [line] = access_lines.with_id("json-1")
    entry = json.loads(line)
    assert {
        "time",
        "request_id",
        "method",
        "path",
        "status",
        "client",
        "user_id",
        "key_id",
        "surface",
        "duration_seconds",
    } <= entry.keys()
    assert entry["path"] == "/api/tags"  # never the query string
    assert entry["status"] == 200
    assert isinstance(entry["user_id"], int)
    assert entry["key_id"] is None
    assert datetime.fromisoformat(entry["time"]).tzinfo is not None


def test_access_log_names_a_refused_request_by_its_route_and_unknown_paths_as_other(
    anonymous, client, access_lines
):
    refused = anonymous.post("/api/chat", json=chat_body(), headers={"X-Request-ID": "refused-1"})
    assert refused.status_code == 401
    missing = client.get("/no/such/page", headers={"X-Request-ID": "missing-1"})
    assert missing.status_code == 404
    [refused_line] = access_lines.with_id("refused-1")
    [missing_line] = access_lines.with_id("missing-1")
    assert _fields(refused_line)["surface"] == "/api/chat"
    assert _fields(refused_line)["status"] == "401"
    assert _fields(missing_line)["surface"] == "other"
    assert _fields(missing_line)["status"] == "404"


def test_access_log_names_a_routes_template_not_its_path(client, access_lines):
    client.delete("/keys/999999", headers={"X-Request-ID": "template-1"})
    [line] = access_lines.with_id("template-1")
    assert _fields(line)["surface"] == "/keys/{key_id}"


def test_access_log_holds_no_password_token_key_or_prompt(gateway: RunningGateway, access_lines):
    password = "correct-horse-battery-staple-42"
    gateway.services.users.create("secretive@example.com", password, "user")
    signed_in = httpx.post(
        f"{gateway.url}/login",
        json={"email": "secretive@example.com", "password": password},
        headers={"X-Request-ID": "login-1"},
    )
    token = signed_in.json()["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    created = httpx.post(f"{gateway.url}/keys", json={"name": "script"}, headers=bearer)
    api_key = created.json()["key"]
    key_id = created.json()["id"]
    with_key = httpx.get(
        f"{gateway.url}/api/tags",
        headers={"Authorization": f"Bearer {api_key}", "X-Request-ID": "key-1"},
    )
    assert with_key.status_code == 200
    secret_word = "xylophone-zeppelin-7781"
    chat = httpx.post(
        f"{gateway.url}/api/chat",
        json={**chat_body(text=f"the vault code is {secret_word}"), "stream": False},
        headers={**bearer, "X-Request-ID": "chat-1"},
        timeout=30,
    )
    assert chat.status_code == 200
    login_line = access_lines.with_id("login-1")[0]
    key_line = access_lines.with_id("key-1")[0]
    access_lines.with_id("chat-1")
    assert _fields(login_line)["user_id"] != "-"
    assert _fields(key_line)["key_id"] == str(key_id)
    everything = "\n".join(access_lines.lines)
    for secret in (password, token, api_key, secret_word, "Bearer"):
        assert secret not in everything


def test_access_log_line_waits_for_the_end_of_a_stream(client, access_lines):
    started = time.monotonic()
    with client.stream(
        "POST", "/api/chat", json=chat_body(tokens=5, interval=0.1), headers={"X-Request-ID": "stream-1"}
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines)
        assert access_lines.with_id("stream-1", timeout=0.1) == []  # not before the answer has ended
        for _ in lines:
            pass
    [line] = access_lines.with_id("stream-1")
    assert float(_fields(line)["duration_seconds"]) >= 0.3
    assert time.monotonic() - started >= 0.3


def _line_through_the_middleware(access_lines: Lines, log_format: str, request_id: str, usage: bool) -> str:
    """The line the middleware alone writes for one request, a model call's (with its usage record) or not."""

    class Endpoint:  # an ASGI app, as the relay endpoints are
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            entry = request_log(scope)
            assert entry is not None
            if usage:
                entry.usage = UsageRecord(
                    at=datetime.now(UTC),
                    user_id=7,
                    key_id=None,
                    surface="/api/chat",
                    model="llama3.2:1b",
                    band="batch",
                    outcome=Outcome.CANCELLED,
                    status=200,
                    host="gpu-1",
                    prompt_tokens=12,
                    completion_tokens=None,
                    queue_seconds=0.25,
                    ttfb_seconds=0.5,
                    estimated=True,
                )
            await PlainTextResponse("ok")(scope, receive, send)

    app = Starlette(
        routes=[Route("/api/chat", Endpoint(), methods=["POST"])],
        middleware=[Middleware(AccessLog, log_format=log_format)],
    )

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.post("/api/chat", headers={"X-Request-ID": request_id})

    assert asyncio.run(ask()).headers["X-Request-ID"] == request_id
    [line] = access_lines.with_id(request_id)
    return line


def test_access_log_says_what_a_model_call_used(access_lines):
    """The fields a model call's usage record adds, through the middleware alone."""
    entry = json.loads(_line_through_the_middleware(access_lines, "json", "usage-1", usage=True))
    assert entry["model"] == "llama3.2:1b"
    assert entry["host"] == "gpu-1"
    assert entry["band"] == "batch"
    assert entry["outcome"] == "cancelled"
    assert entry["queue_seconds"] == 0.25
    assert entry["ttfb_seconds"] == 0.5
    assert entry["prompt_tokens"] == 12
    assert entry["completion_tokens"] is None
    assert entry["estimated"] is True


@pytest.mark.parametrize("usage", [True, False], ids=["model call", "other request"])
def test_access_log_text_and_json_lines_carry_the_same_fields_in_the_same_order(access_lines, usage):
    """The two formats are written by two formatters: whatever one says, the other says too."""
    as_json = json.loads(_line_through_the_middleware(access_lines, "json", f"json-{usage}", usage))
    as_text = _fields(_line_through_the_middleware(access_lines, "text", f"text-{usage}", usage))
    assert list(as_text) == list(as_json)

    def shown(value: object) -> str:
        return "-" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)

    differ = {"time", "request_id", "duration_seconds"}  # a moment, an id and a duration of their own
    assert {name: value for name, value in as_text.items() if name not in differ} == {
        name: shown(value) for name, value in as_json.items() if name not in differ
    }


def test_access_log_a_second_user_is_named_by_their_id(gateway, access_lines):
    token = add_user(gateway, f"someone-{time.monotonic_ns()}@example.com")
    httpx.get(f"{gateway.url}/me", headers={"Authorization": f"Bearer {token}", "X-Request-ID": "me-1"})
    [line] = access_lines.with_id("me-1")
    assert _fields(line)["user_id"] not in ("-", "1")


def test_python_main_prints_the_gateways_access_lines_not_uvicorns(tmp_path, ollama):
    with running_main(tmp_path, OLLAMA_URL=ollama.url, ADMIN_PASSWORD="serving-test-password") as (
        url,
        console,
        _,
    ):
        httpx.get(f"{url}/health", headers={"X-Request-ID": "main-1"})
        deadline = time.monotonic() + 5
        while "main-1" not in console.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = console.read_text()
    [line] = [line for line in text.splitlines() if "main-1" in line]
    assert "path=/health status=200" in line
    assert "HTTP/1.1" not in text  # uvicorn's own access lines


def test_access_log_a_model_call_through_the_gateway_says_what_it_used(make_gateway, access_lines):
    gateway = make_gateway(log_format="json")
    headers = {**gateway.admin_headers(), "X-Request-ID": "chat-usage-1"}
    answer = httpx.post(f"{gateway.url}/api/chat", json=chat_body(tokens=5), headers=headers, timeout=30)
    final = json.loads(answer.text.strip().splitlines()[-1])
    [line] = access_lines.with_id("chat-usage-1")
    entry = json.loads(line)
    assert (entry["surface"], entry["model"], entry["outcome"]) == ("/api/chat", "llama3.2:1b", "completed")
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (final["prompt_eval_count"], 5)
    assert entry["host"] and entry["band"] == "interactive" and entry["estimated"] is False
    assert entry["ttfb_seconds"] <= entry["duration_seconds"]

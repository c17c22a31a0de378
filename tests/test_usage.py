"""Usage records (issue 13): exactly one per model call that reached admission, whatever its outcome, with
Ollama's own counters when the answer completed and marked estimates when it did not; and the reports built
on them (GET /me/usage, GET /admin/usage, as JSON and CSV)."""

import concurrent.futures
import csv
import io
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select

from db.models import UsageRow
from tests.fake_ollama import DEFAULT_TOKENS, FakeOllama
from tests.rawhttp import open_post
from tests.servers import RunningGateway, add_user
from tests.streams import chat_body

MODEL = "llama3.2:1b"
# The records are written and summed by the database: the tests of those paths (marked) run on Postgres too;
# the outcomes and counts are the gateway's, the same on either.


@pytest.fixture
def host() -> Iterator[FakeOllama]:
    with FakeOllama(num_parallel=1) as fake:
        yield fake


@pytest.fixture
def gateway(make_gateway, host) -> RunningGateway:
    return make_gateway(ollama_url=host.url, ollama_parallel=1)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def records(gateway: RunningGateway, expected: int, timeout: float = 10) -> list[UsageRow]:
    """The usage records once there are `expected` of them (a stream's ends as its relay ends, a moment
    after the client saw it); fails if there are ever more."""
    deadline = time.monotonic() + timeout
    while True:
        gateway.run(gateway.services.usage.writer.flush())
        with gateway.services.db.session() as session:
            rows = list(session.scalars(select(UsageRow).order_by(UsageRow.id)))
        assert len(rows) <= expected, [(row.surface, row.outcome) for row in rows]
        if len(rows) == expected or time.monotonic() > deadline:
            assert len(rows) == expected, [(row.surface, row.outcome) for row in rows]
            return rows
        time.sleep(0.05)


def final_line(response: httpx.Response) -> dict:
    return json.loads(response.text.strip().splitlines()[-1])


def sse_events(text: str) -> list[dict]:
    return [
        json.loads(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


# -- exact counts for completed requests ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/chat", "/api/chat"])
def test_a_completed_chat_stream_records_ollamas_own_counters(gateway, path):
    headers = gateway.admin_headers()
    answer = httpx.post(f"{gateway.url}{path}", json=chat_body(tokens=6), headers=headers, timeout=30)
    assert answer.status_code == 200
    counters = final_line(answer)
    [row] = records(gateway, 1)
    assert (row.surface, row.model, row.outcome, row.status) == (path, MODEL, "completed", 200)
    assert row.prompt_tokens == counters["prompt_eval_count"]
    assert row.completion_tokens == counters["eval_count"] == 6
    slot_ns = counters["prompt_eval_duration"] + counters["eval_duration"]
    assert row.slot_seconds == pytest.approx(slot_ns / 1e9)
    assert row.load_seconds == pytest.approx(counters["load_duration"] / 1e9)
    assert not row.estimated
    assert row.host == gateway.services.fleet.hosts.by_id["env-1"].name
    assert row.ttfb_seconds is not None and 0 < row.ttfb_seconds <= row.duration_seconds
    assert row.user_id == 1 and row.key_id is None and row.band == "interactive"


def test_a_whole_chat_answer_records_its_counters(gateway):
    body = {**chat_body(tokens=4), "stream": False}
    answer = httpx.post(f"{gateway.url}/api/chat", json=body, headers=gateway.admin_headers(), timeout=30)
    counters = answer.json()
    [row] = records(gateway, 1)
    assert (row.prompt_tokens, row.completion_tokens) == (counters["prompt_eval_count"], 4)
    assert not row.estimated


def test_a_generate_stream_records_its_counters(gateway):
    body = {"model": MODEL, "prompt": "Tell me", "options": {"fake_tokens": 5}}
    answer = httpx.post(f"{gateway.url}/api/generate", json=body, headers=gateway.admin_headers(), timeout=30)
    counters = final_line(answer)
    [row] = records(gateway, 1)
    assert (row.surface, row.prompt_tokens, row.completion_tokens) == (
        "/api/generate",
        counters["prompt_eval_count"],
        5,
    )
    assert not row.estimated


def test_an_embedding_records_its_prompt_tokens_and_no_completion(gateway):
    body = {"model": MODEL, "input": ["one two three", "four five"]}
    answer = httpx.post(f"{gateway.url}/api/embed", json=body, headers=gateway.admin_headers(), timeout=30)
    assert answer.status_code == 200
    [row] = records(gateway, 1)
    assert row.prompt_tokens == answer.json()["prompt_eval_count"] > 0
    assert row.completion_tokens == 0
    expected = (answer.json()["total_duration"] - answer.json()["load_duration"]) / 1e9
    assert row.slot_seconds == pytest.approx(expected)
    assert not row.estimated


def test_a_cached_prompt_without_a_count_is_unknown_never_zero(gateway):
    body = {**chat_body(tokens=3, cached_prompt=True), "stream": False}
    answer = httpx.post(f"{gateway.url}/api/chat", json=body, headers=gateway.admin_headers(), timeout=30)
    assert "prompt_eval_count" not in answer.json()  # as Ollama leaves it out (omitempty)
    [row] = records(gateway, 1)
    assert row.prompt_tokens is None
    assert row.completion_tokens == 3
    assert row.estimated


def openai_chat(gateway: RunningGateway, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}], **extra}
    return httpx.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.admin_headers(), timeout=30
    )


def test_an_openai_stream_records_exact_tokens_and_hides_the_usage_it_did_not_ask_for(gateway, host):
    whole = openai_chat(gateway).json()["usage"]
    answer = openai_chat(gateway, stream=True)
    events = sse_events(answer.text)
    assert all("usage" not in event for event in events), events
    assert answer.text.rstrip().endswith("data: [DONE]")
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    # The gateway asked Ollama for it.
    assert json.loads(host.requests[-1].body)["stream_options"] == {"include_usage": True}
    _, row = records(gateway, 2)
    assert (row.prompt_tokens, row.completion_tokens) == (whole["prompt_tokens"], whole["completion_tokens"])
    assert row.outcome == "completed"
    assert row.estimated  # slot-time from the clock: the OpenAI-style answers carry no durations


def test_an_openai_stream_that_asked_for_usage_gets_it(gateway, host):
    answer = openai_chat(gateway, stream=True, stream_options={"include_usage": True})
    usage = [event["usage"] for event in sse_events(answer.text) if event.get("usage")]
    assert len(usage) == 1
    [row] = records(gateway, 1)
    assert (row.prompt_tokens, row.completion_tokens) == (
        usage[0]["prompt_tokens"],
        usage[0]["completion_tokens"],
    )
    assert json.loads(host.requests[-1].body)["stream_options"] == {"include_usage": True}


def test_an_openai_client_that_refused_usage_does_not_get_it(gateway, host):
    answer = openai_chat(gateway, stream=True, stream_options={"include_usage": False})
    assert all("usage" not in event for event in sse_events(answer.text))
    [row] = records(gateway, 1)
    assert row.completion_tokens == len(DEFAULT_TOKENS)


def test_a_whole_openai_answer_records_its_usage(gateway):
    usage = openai_chat(gateway).json()["usage"]
    [row] = records(gateway, 1)
    assert (row.surface, row.prompt_tokens, row.completion_tokens) == (
        "/v1/chat/completions",
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


def test_an_openai_completions_stream_records_exact_tokens(gateway):
    body = {"model": MODEL, "prompt": "Once upon", "stream": True, "options": {"fake_tokens": 4}}
    answer = httpx.post(
        f"{gateway.url}/v1/completions", json=body, headers=gateway.admin_headers(), timeout=30
    )
    assert all("usage" not in event for event in sse_events(answer.text))
    [row] = records(gateway, 1)
    assert row.completion_tokens == 4 and row.prompt_tokens and row.prompt_tokens > 0


def test_openai_embeddings_record_their_prompt_tokens(gateway):
    body = {"model": MODEL, "input": "some words to embed"}
    answer = httpx.post(
        f"{gateway.url}/v1/embeddings", json=body, headers=gateway.admin_headers(), timeout=30
    )
    [row] = records(gateway, 1)
    assert (row.prompt_tokens, row.completion_tokens) == (answer.json()["usage"]["prompt_tokens"], 0)


def test_an_api_key_request_records_the_key(gateway):
    created = httpx.post(f"{gateway.url}/keys", json={"name": "script"}, headers=gateway.admin_headers())
    key = created.json()
    httpx.post(f"{gateway.url}/api/chat", json=chat_body(tokens=2), headers=auth(key["key"]), timeout=30)
    [row] = records(gateway, 1)
    assert row.key_id == key["id"]


# -- cancelled, refused, failed: still one record each --------------------------------------------------


def test_a_stream_cut_short_is_estimated_from_what_was_relayed(gateway, host):
    body = chat_body(tokens=400, interval=0.01)
    with httpx.stream(
        "POST", f"{gateway.url}/api/chat", json=body, headers=gateway.admin_headers(), timeout=30
    ) as answer:
        lines = answer.iter_lines()
        received = [next(lines) for _ in range(20)]
    assert len(received) == 20
    [row] = records(gateway, 1)
    assert row.outcome == "cancelled" and row.estimated
    # What the gateway relayed: the twenty read, and the few in flight when the client closed.
    assert row.completion_tokens is not None and 20 <= row.completion_tokens <= 30
    assert row.prompt_tokens and row.prompt_tokens > 0  # estimated from the request's size
    assert row.slot_seconds is not None and 0 < row.slot_seconds < 4
    # And Ollama's request was closed at once, not drained to count it.
    host.wait_until(lambda: host.model_stats(MODEL).in_flight == 0, 2.0)
    assert host.model_stats(MODEL).in_flight == 0


def test_an_openai_stream_cut_short_is_estimated_in_events(gateway):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    body["options"] = {"fake_tokens": 400, "fake_interval": 0.01}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=gateway.admin_headers(), timeout=30
    ) as answer:
        events = 0
        for line in answer.iter_lines():
            events += line.startswith("data: ")
            if events == 15:
                break
    [row] = records(gateway, 1)
    assert row.outcome == "cancelled"
    assert row.completion_tokens is not None and 15 <= row.completion_tokens <= 25


def send_chat(gateway: RunningGateway, headers: dict[str, str], body: dict) -> socket.socket:
    """A chat on a raw connection, which the test closes when it wants the client gone."""
    raw = json.dumps(body).encode()
    length = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
    sock = open_post(gateway.url, "/api/chat", {**headers, **length})
    sock.sendall(raw)
    return sock


def hold_the_slot(gateway: RunningGateway, host: FakeOllama, headers: dict[str, str]) -> socket.socket:
    """A long stream that holds the host's only slot (closed by the caller)."""
    sock = send_chat(gateway, headers, chat_body(tokens=200, interval=0.02))
    host.wait_until(lambda: host.model_stats(MODEL).in_flight == 1, 5.0)
    return sock


def test_a_client_that_leaves_while_queued_leaves_one_record(gateway, host):
    headers = gateway.admin_headers()
    holder = hold_the_slot(gateway, host, headers)
    waiter = send_chat(gateway, headers, chat_body(tokens=2))
    scheduler = gateway.services.fleet.scheduler
    deadline = time.monotonic() + 5
    while not any(scheduler.waiting().values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any(scheduler.waiting().values())
    waiter.close()
    [row] = records(gateway, 1)
    assert (row.outcome, row.status, row.host) == ("cancelled", 499, None)
    assert (row.prompt_tokens, row.completion_tokens, row.slot_seconds) == (0, 0, 0.0)
    assert not row.estimated
    holder.close()
    records(gateway, 2)


def test_a_client_that_leaves_before_the_first_byte_leaves_one_record(gateway, host):
    sock = send_chat(gateway, gateway.admin_headers(), chat_body(tokens=3, load=1.0))  # a second to load
    host.wait_until(lambda: host.model_stats(MODEL).in_flight == 1, 5.0)
    sock.close()
    [row] = records(gateway, 1)
    assert row.outcome == "cancelled"
    assert row.host is not None
    assert row.completion_tokens is not None and row.completion_tokens <= 3


def test_requests_refused_by_a_cap_or_timed_out_leave_one_record_each(make_gateway, host):
    gateway = make_gateway(
        ollama_url=host.url, ollama_parallel=1, max_waiting_per_user=1, queue_timeout_interactive=0.5
    )
    headers = gateway.admin_headers()
    holder = hold_the_slot(gateway, host, headers)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        waiting = pool.submit(
            httpx.post, f"{gateway.url}/api/chat", json=chat_body(tokens=1), headers=headers, timeout=30
        )
        time.sleep(0.2)
        refused = httpx.post(f"{gateway.url}/api/chat", json=chat_body(tokens=1), headers=headers, timeout=30)
        timed_out = waiting.result()
    assert refused.status_code == 429
    assert timed_out.status_code == 503
    holder.close()
    rows = records(gateway, 3)
    outcomes = sorted((row.outcome, row.status) for row in rows if row.outcome != "cancelled")
    assert outcomes == [("refused", 429), ("timeout", 503)]


def test_an_unknown_model_and_an_unreachable_host_leave_one_record_each(make_gateway, unused_port):
    gateway = make_gateway(ollama_url=f"http://127.0.0.1:{unused_port}")
    headers = gateway.admin_headers()
    answer = httpx.post(f"{gateway.url}/api/chat", json=chat_body(), headers=headers, timeout=30)
    assert answer.status_code == 502
    [row] = records(gateway, 1)
    assert (row.outcome, row.status) == ("upstream_error", 502)


def test_ollamas_own_error_is_recorded_as_an_error(gateway):
    body = chat_body(model="no-such-model:1b")
    answer = httpx.post(f"{gateway.url}/api/chat", json=body, headers=gateway.admin_headers(), timeout=30)
    assert answer.status_code == 404
    [row] = records(gateway, 1)
    assert (row.outcome, row.status, row.model) == ("error", 404, "no-such-model:1b")


@pytest.mark.storage
def test_requests_on_every_surface_leave_exactly_one_record_each(gateway):
    headers = gateway.admin_headers()
    messages = [{"role": "user", "content": "Hi"}]
    calls = [
        ("/chat", chat_body(tokens=2)),
        ("/api/chat", {**chat_body(tokens=2), "stream": False}),
        ("/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False}),
        ("/api/embed", {"model": MODEL, "input": "Hi"}),
        ("/api/embeddings", {"model": MODEL, "prompt": "Hi"}),
        ("/v1/chat/completions", {"model": MODEL, "messages": messages, "stream": True}),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi"}),
        ("/v1/embeddings", {"model": MODEL, "input": "Hi"}),
        ("/v1/responses", {"model": MODEL, "input": "Hi"}),
        ("/api/chat", chat_body(model="missing:1b")),  # refused by Ollama
    ]
    for path, body in calls:
        httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=30)
    rows = records(gateway, len(calls))
    assert [row.surface for row in rows] == [path for path, _ in calls]
    # Requests refused before admission (a bad body, no credentials) are no model calls: no record.
    httpx.post(f"{gateway.url}/api/chat", content=b'{"model": ', headers=headers, timeout=30)
    httpx.post(f"{gateway.url}/api/chat", json=chat_body(), timeout=30)
    records(gateway, len(calls))


# -- the reports ------------------------------------------------------------------------------------------


@pytest.mark.storage
def test_my_usage_counts_only_mine_grouped_by_model_and_day(gateway):
    mine = auth(add_user(gateway, "ada@example.com"))
    for _ in range(2):
        httpx.post(f"{gateway.url}/api/chat", json=chat_body(tokens=3), headers=mine, timeout=30)
    httpx.post(
        f"{gateway.url}/api/chat", json=chat_body(tokens=5), headers=gateway.admin_headers(), timeout=30
    )
    report = httpx.get(f"{gateway.url}/me/usage", params={"group_by": "model,day"}, headers=mine).json()
    [row] = report["rows"]
    assert row["model"] == MODEL and len(row["day"]) == 10
    assert (row["requests"], row["completion_tokens"], row["cancelled"], row["errors"]) == (2, 6, 0, 0)
    assert report["totals"]["requests"] == 2
    assert report["quota"] is None


@pytest.mark.storage
def test_everyones_usage_by_user_as_csv(gateway):
    ada = auth(add_user(gateway, "ada@example.com"))
    httpx.post(f"{gateway.url}/api/chat", json=chat_body(tokens=3), headers=ada, timeout=30)
    httpx.post(
        f"{gateway.url}/api/chat", json=chat_body(tokens=4), headers=gateway.admin_headers(), timeout=30
    )
    answer = httpx.get(
        f"{gateway.url}/admin/usage",
        params={"group_by": "user", "format": "csv"},
        headers=gateway.admin_headers(),
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    by_email = {row["email"]: row for row in rows}
    assert by_email["ada@example.com"]["completion_tokens"] == "3"
    assert by_email["admin@example.com"]["completion_tokens"] == "4"
    assert list(rows[0]) == [
        "user",
        "email",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "slot_seconds",
        "cancelled",
        "errors",
        "estimated",
    ]


def test_a_model_name_in_the_csv_is_never_a_formula(gateway):
    httpx.post(
        f"{gateway.url}/api/chat",
        json=chat_body(model="=cmd|calc"),
        headers=gateway.admin_headers(),
        timeout=30,
    )
    answer = httpx.get(
        f"{gateway.url}/admin/usage",
        params={"group_by": "model", "format": "csv"},
        headers=gateway.admin_headers(),
    )
    [row] = list(csv.DictReader(io.StringIO(answer.text)))
    assert row["model"].startswith("'=")


@pytest.mark.storage
def test_the_time_range_keeps_what_is_inside_it(gateway):
    httpx.post(
        f"{gateway.url}/api/chat", json=chat_body(tokens=2), headers=gateway.admin_headers(), timeout=30
    )
    headers = gateway.admin_headers()
    past = httpx.get(f"{gateway.url}/admin/usage", params={"until": "2020-01-01"}, headers=headers).json()
    now = httpx.get(f"{gateway.url}/admin/usage", params={"since": "2020-01-01"}, headers=headers).json()
    assert past["totals"]["requests"] == 0
    assert now["totals"]["requests"] == 1


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"group_by": "password"}, 400),
        ({"since": "yesterday"}, 400),
        ({"format": "xml"}, 422),
    ],
    ids=["unknown-group", "bad-date", "unknown-format"],
)
def test_a_bad_report_request_is_refused_with_a_json_error(gateway, params, status):
    answer = httpx.get(f"{gateway.url}/admin/usage", params=params, headers=gateway.admin_headers())
    assert answer.status_code == status
    assert "error" in answer.json()


def test_only_admins_see_everyones_usage(gateway):
    user = auth(add_user(gateway, "ada@example.com"))
    assert httpx.get(f"{gateway.url}/admin/usage", headers=user).status_code == 403
    assert httpx.get(f"{gateway.url}/admin/usage").status_code == 401
    assert httpx.get(f"{gateway.url}/me/usage").status_code == 401


def test_the_metrics_agree_with_the_records(gateway):
    headers = gateway.admin_headers()
    for tokens in (2, 3, 4):
        httpx.post(f"{gateway.url}/api/chat", json=chat_body(tokens=tokens), headers=headers, timeout=30)
    rows = records(gateway, 3)
    text = httpx.get(f"{gateway.url}/metrics", headers=headers).text
    completion = sum(row.completion_tokens or 0 for row in rows)
    prompt = sum(row.prompt_tokens or 0 for row in rows)
    where = f'host="{rows[0].host}"'  # its own test Ollama: no other test's counts under this label
    assert f'gateway_tokens_total{{{where},kind="completion",model="{MODEL}"}} {float(completion)}' in text
    assert f'gateway_tokens_total{{{where},kind="prompt",model="{MODEL}"}} {float(prompt)}' in text
    assert f'gateway_model_loads_total{{{where},model="{MODEL}"}} 1.0' in text

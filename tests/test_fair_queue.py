"""The fair queue through the gateway, against a test double that schedules as Ollama does: a colleague's
chat is not stuck behind a batch job, two batch users share the slots, a client that leaves while waiting
never reaches Ollama, and no storm of aborted requests leaves a slot counted."""

import concurrent.futures
import json
import random
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fake_ollama import FakeOllama
from tests.rawhttp import open_post
from tests.servers import RunningGateway, add_user
from tests.streams import chat_body

MODEL = "llama3.2:1b"


@pytest.fixture
def one_slot_host() -> Iterator[FakeOllama]:
    with FakeOllama(num_parallel=1) as fake:
        yield fake


@pytest.fixture
def two_slot_host() -> Iterator[FakeOllama]:
    with FakeOllama(num_parallel=2) as fake:
        yield fake


def auth(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def chat(gateway: RunningGateway, headers: dict[str, str], text: str = "Hi", **options) -> httpx.Response:
    body = {**chat_body(text=text, **options), "stream": False}
    return httpx.post(f"{gateway.url}/api/chat", json=body, headers=headers, timeout=60)


def first_byte_after(gateway: RunningGateway, headers: dict[str, str], **options) -> float:
    """Seconds from sending a streamed chat to its first line."""
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{gateway.url}/api/chat", json=chat_body(**options), headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines)
        first = time.monotonic() - started
        for _ in lines:
            pass
    return first


def settled(gateway: RunningGateway, host: FakeOllama, timeout: float = 10) -> None:
    """Waits until the gateway counts nothing in flight or waiting, and the host runs nothing."""
    scheduler = gateway.services.fleet.scheduler
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = host.model_stats(MODEL)
        if (
            not scheduler.inflight_by_slot()
            and not any(scheduler.waiting().values())
            and stats.in_flight == 0
            and stats.queued == 0
        ):
            return
        time.sleep(0.02)
    raise AssertionError(
        f"still counted: {scheduler.inflight_by_slot()}, waiting {scheduler.waiting()}, "
        f"host {host.model_stats(MODEL)}"
    )


def test_a_chat_is_not_stuck_behind_someone_elses_batch_job(make_gateway, two_slot_host):
    gateway = make_gateway(ollama_url=two_slot_host.url, ollama_parallel=2)
    batch = auth(add_user(gateway, "a@example.com"), **{"X-Priority": "batch"})
    chatter = auth(add_user(gateway, "b@example.com"))
    job: dict = {"tokens": 8, "interval": 0.05}  # about 0.4 s each
    idle = first_byte_after(gateway, chatter, **job)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        jobs = [pool.submit(chat, gateway, batch, **job) for _ in range(12)]
        time.sleep(0.3)  # all twelve are in: two running, ten waiting
        waits = []
        for _ in range(3):
            waits.append(first_byte_after(gateway, chatter, **job))
            time.sleep(0.1)
        statuses = [future.result().status_code for future in jobs]
    assert statuses == [200] * 12
    # Each chat waited at most for one running request to end, never for the ten queued before it.
    assert max(waits) < idle + 0.4 + 0.3, (idle, waits)
    settled(gateway, two_slot_host)


def test_directly_to_ollama_the_same_chat_waits_behind_the_whole_job(two_slot_host):
    # The comparison: Ollama's own queue is first come, first served.
    job: dict = {"tokens": 8, "interval": 0.05}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        jobs = [
            pool.submit(
                httpx.post,
                f"{two_slot_host.url}/api/chat",
                json={**chat_body(**job), "stream": False},
                timeout=60,
            )
            for _ in range(12)
        ]
        time.sleep(0.3)
        started = time.monotonic()
        with httpx.stream(
            "POST", f"{two_slot_host.url}/api/chat", json=chat_body(**job), timeout=60
        ) as answer:
            next(answer.iter_lines())
            waited = time.monotonic() - started
        for future in jobs:
            future.result()
    assert waited > 1.5  # five rounds of two ahead of it


def test_two_batch_users_share_the_slot_time_equally(make_gateway, one_slot_host):
    gateway = make_gateway(ollama_url=one_slot_host.url, ollama_parallel=1)
    first = auth(add_user(gateway, "first@example.com"), **{"X-Priority": "batch"})
    second = auth(add_user(gateway, "second@example.com"), **{"X-Priority": "batch"})
    job: dict = {"tokens": 3, "interval": 0.02}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(chat, gateway, first, "first", **job) for _ in range(6)]
        time.sleep(0.2)  # all of the first user's are queued before any of the second's
        futures += [pool.submit(chat, gateway, second, "second", **job) for _ in range(6)]
        assert [future.result().status_code for future in futures] == [200] * 12
    ran = [json.loads(request.body)["messages"][0]["content"] for request in one_slot_host.requests]
    # After the one already running, they take turns: in any stretch of the middle, as many of each.
    middle = ran[2:10]
    assert abs(middle.count("first") - middle.count("second")) <= 2, ran


def test_a_client_that_leaves_while_waiting_never_reaches_ollama(make_gateway, one_slot_host):
    gateway = make_gateway(ollama_url=one_slot_host.url, ollama_parallel=1)
    headers = gateway.admin_headers()
    running = threading.Thread(
        target=chat, args=(gateway, headers, "running"), kwargs={"tokens": 10, "interval": 0.05}
    )
    running.start()
    time.sleep(0.15)
    sock = open_chat(gateway, headers, {**chat_body(text="left"), "stream": False})
    time.sleep(0.1)
    assert gateway.services.fleet.scheduler.waiting()["interactive"] == 1
    sock.close()
    deadline = time.monotonic() + 2
    while gateway.services.fleet.scheduler.waiting()["interactive"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gateway.services.fleet.scheduler.waiting()["interactive"] == 0
    running.join()
    settled(gateway, one_slot_host)
    ran = [json.loads(request.body)["messages"][0]["content"] for request in one_slot_host.requests]
    assert ran == ["running"]


def open_chat(gateway: RunningGateway, headers: dict[str, str], body: dict) -> socket.socket:
    """A chat sent on a raw connection, whose answer is left to the caller to read, or not."""
    raw = json.dumps(body).encode()
    sock = open_post(
        gateway.url,
        "/api/chat",
        {**headers, "Content-Type": "application/json", "Content-Length": str(len(raw))},
    )
    sock.sendall(raw)
    return sock


def _abort(gateway: RunningGateway, headers: dict[str, str], when: str, rng: random.Random) -> None:
    sock = open_chat(gateway, headers, chat_body(tokens=6, interval=0.03, load=0.1))
    try:
        if when == "waiting":
            time.sleep(rng.uniform(0.0, 0.1))
        elif when == "before the first byte":
            time.sleep(rng.uniform(0.0, 0.3))
        elif when == "mid-stream":
            sock.settimeout(10)
            received = b""
            while received.count(b"\n") < 12:  # the head and a couple of lines
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        else:
            sock.settimeout(10)
            while sock.recv(65536):
                pass
    except OSError:
        pass
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()


def test_a_storm_of_aborted_requests_leaves_no_slot_counted(make_gateway, two_slot_host):
    gateway = make_gateway(ollama_url=two_slot_host.url, ollama_parallel=2)
    headers = gateway.admin_headers()
    rng = random.Random(12)
    kinds = ["waiting", "before the first byte", "mid-stream", "whole"]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        list(pool.map(lambda n: _abort(gateway, headers, kinds[n % 4], rng), range(48)))
    settled(gateway, two_slot_host)
    assert two_slot_host.model_stats(MODEL).max_in_flight <= 2
    # And the gateway still serves.
    assert chat(gateway, headers).status_code == 200


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param("/api/chat", lambda answer: answer["error"], id="ollama"),
        pytest.param("/v1/chat/completions", lambda answer: answer["error"]["message"], id="openai"),
    ],
)
def test_past_the_waiting_cap_every_surface_answers_429_in_its_own_shape(
    make_gateway, one_slot_host, path, message
):
    gateway = make_gateway(ollama_url=one_slot_host.url, ollama_parallel=1, max_waiting_per_user=1)
    headers = gateway.admin_headers()
    slow = {**chat_body(tokens=10, interval=0.05), "stream": False}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(httpx.post, f"{gateway.url}/api/chat", json=slow, headers=headers, timeout=30)
        time.sleep(0.15)
        waiting = pool.submit(httpx.post, f"{gateway.url}/api/chat", json=slow, headers=headers, timeout=30)
        time.sleep(0.15)
        refused = httpx.post(f"{gateway.url}{path}", json={**chat_body(), "stream": False}, headers=headers)
        assert running.result().status_code == 200
        assert waiting.result().status_code == 200
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert "waiting" in message(refused.json())
    if path.startswith("/v1/"):  # as OpenAI says a rate limit, not a used-up budget
        assert refused.json()["error"]["type"] == "requests"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"


def _hang_up_soon(gateway: RunningGateway, headers: dict[str, str], seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        sock = open_chat(gateway, headers, {**chat_body(tokens=1, interval=0.0), "stream": False})
        try:
            time.sleep(rng.uniform(0.0, 0.03))
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()


def test_clients_leaving_as_their_turn_comes_leave_no_slot_counted(make_gateway, one_slot_host, caplog):
    # Many clients, each gone within milliseconds: some leave while waiting, some in the very moment their
    # turn comes. No slot may stay counted (one would leave the model answering 503 for good), nothing logged.
    gateway = make_gateway(ollama_url=one_slot_host.url, ollama_parallel=1, queue_timeout_interactive=3)
    headers = gateway.admin_headers()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda seed: _hang_up_soon(gateway, headers, seed), range(12)))
    settled(gateway, one_slot_host)
    assert chat(gateway, headers).status_code == 200
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


def test_spellings_of_one_model_share_its_slots(make_gateway, two_slot_host):
    gateway = make_gateway(ollama_url=two_slot_host.url, ollama_parallel=2)
    headers = gateway.admin_headers()
    names = ["llama3.2:1b", "library/llama3.2:1b", "registry.ollama.ai/library/llama3.2:1b", "LLAMA3.2:1b"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda name: httpx.post(
                    f"{gateway.url}/api/chat",
                    json={**chat_body(tokens=4, interval=0.05), "model": name, "stream": False},
                    headers=headers,
                    timeout=30,
                ),
                names * 2,
            )
        )
    assert all(answer.status_code in (200, 404) for answer in answers)
    # However it is spelt, the gateway never sent the model more than its two slots.
    assert max(request.slot_wait or 0 for request in two_slot_host.requests) < 0.02
    settled(gateway, two_slot_host)

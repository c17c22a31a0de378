"""The fake Ollama schedules model runs as Ollama does (tests/fake_ollama.py): slots per model with a hidden
FIFO behind them, one load for a cold model however many ask for it, /api/ps listing what is loaded, and final
counters that add up to what happened. Driven over real HTTP on loopback, as a gateway would drive it.

A request that holds a slot lasts HOLD seconds (tokens paced by `fake_interval`): long enough for the test to
line others up behind it on a loaded machine, short enough to keep each test well under a second.
"""

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.fake_ollama import FakeOllama, ModelStats, RecordedRequest

MODEL = "llama3.2:1b"
OTHER = "llava:7b"
HOLDING: dict[str, Any] = {"tokens": 5, "interval": 0.05}
HOLD = 0.25
QUICK: dict[str, Any] = {"tokens": 1, "interval": 0.0}
WAIT = 2.0  # how long a test waits for a state that should come at once
# Timing tolerances for a loaded 2-core machine: what the fake measures of itself is exact to the nanosecond;
# what the test measures from outside includes threads and HTTP.
EXACT = 0.002
OUTSIDE = 0.1


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def body(label: str, model: str = MODEL, stream: bool = False, **options: Any) -> dict[str, Any]:
    """A generate request, told apart from the others by its prompt."""
    return {
        "model": model,
        "prompt": label,
        "stream": stream,
        "options": {f"fake_{name}": value for name, value in options.items()},
    }


def post(
    fake: FakeOllama, payload: dict[str, Any], path: str = "/api/generate", **kwargs: Any
) -> httpx.Response:
    return httpx.post(fake.url + path, json=payload, timeout=kwargs.pop("timeout", 10), **kwargs)


def send(pool: ThreadPoolExecutor, fake: FakeOllama, payload: dict[str, Any], path: str = "/api/generate"):
    return pool.submit(post, fake, payload, path)


def stats(fake: FakeOllama, model: str = MODEL) -> ModelStats:
    return fake.model_stats(model)


def until(fake: FakeOllama, condition: Callable[[ModelStats], bool], model: str = MODEL) -> None:
    fake.wait_until(lambda: condition(fake.model_stats(model)), WAIT)


def queued(count: int) -> Callable[[ModelStats], bool]:
    return lambda model: model.queued == count


def hold_a_slot(
    pool: ThreadPoolExecutor, fake: FakeOllama, slots: int = 1, holding: dict[str, Any] = HOLDING
) -> list[Future[httpx.Response]]:
    """Fill the model's `slots` for HOLD seconds (or as long as `holding` says)."""
    holders = [send(pool, fake, body(f"holder {index}", **holding)) for index in range(slots)]
    until(fake, lambda model: model.in_flight == slots)
    return holders


def recorded(fake: FakeOllama, label: str) -> RecordedRequest:
    """The request whose prompt (or embedding input) is `label`."""
    for request in list(fake.requests):
        sent = json.loads(request.body) if request.body else {}
        if label in (sent.get("prompt"), sent.get("input")):
            return request
    raise AssertionError(f"no request {label!r}")


def final(response: httpx.Response) -> dict[str, Any]:
    """The final line of a streamed answer, or the whole answer."""
    return json.loads(response.text.splitlines()[-1])


def unexplained(counters: dict[str, Any]) -> float:
    """Total minus load, prompt evaluation and evaluation, in seconds: what the counters leave unexplained."""
    phases = ("load_duration", "prompt_eval_duration", "eval_duration")
    return (counters["total_duration"] - sum(counters[phase] for phase in phases)) / 1e9


def ps_names(fake: FakeOllama) -> list[str]:
    return [model["name"] for model in httpx.get(fake.url + "/api/ps").json()["models"]]


def open_raw(fake: FakeOllama, payload: dict[str, Any]) -> socket.socket:
    """A generate request on a socket of the test's own, to see every byte and to hang up at will."""
    data = json.dumps(payload).encode()
    host, port = fake.host_header.split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: {fake.host_header}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


# Slots


def test_requests_beyond_the_slots_wait_and_the_most_in_flight_is_observed(make_fake, pool):
    fake = make_fake(num_parallel=2)
    holders = hold_a_slot(pool, fake, slots=2)
    waiters = [send(pool, fake, body(f"waiter {index}", **QUICK)) for index in range(3)]
    until(fake, lambda model: model.queued == 3)
    assert stats(fake).in_flight == 2
    assert all(future.result().status_code == 200 for future in holders + waiters)
    assert stats(fake) == ModelStats(
        loaded=True, loading=False, loads=0, in_flight=0, queued=0, max_in_flight=2, max_sent=5
    )
    # None got a slot before a holder had produced all its tokens.
    first_free = min(recorded(fake, f"holder {index}").slot_at or 0 for index in range(2)) + HOLD - EXACT
    assert all((recorded(fake, f"waiter {index}").slot_at or 0) >= first_free for index in range(3))


def test_a_model_may_have_fewer_slots_than_its_host(make_fake, pool):
    fake = make_fake(num_parallel=2, model_parallel={OTHER: 1})
    futures = [
        send(pool, fake, body(f"{model} {index}", model, **HOLDING))
        for model in (MODEL, OTHER)
        for index in range(2)
    ]
    until(fake, lambda model: model.in_flight == 2)
    until(fake, lambda model: model.in_flight == 1 and model.queued == 1, OTHER)
    assert all(future.result().status_code == 200 for future in futures)
    assert (stats(fake).max_in_flight, stats(fake, OTHER).max_in_flight) == (2, 1)


def test_without_num_parallel_no_request_waits(make_fake, pool):
    fake = make_fake()
    futures = [send(pool, fake, body(f"request {index}", **HOLDING)) for index in range(6)]
    until(fake, lambda model: model.in_flight == 6)
    assert all(future.result().status_code == 200 for future in futures)
    assert all(request.slot_wait is not None and request.slot_wait < EXACT for request in fake.requests)


def test_waiters_get_the_slot_in_the_order_they_asked_for_it(make_fake, pool):
    fake = make_fake(num_parallel=1)
    # Held a good while: five requests must queue behind it one after another, on a loaded machine too.
    futures = hold_a_slot(pool, fake, holding={"tokens": 40, "interval": 0.05})
    labels = [f"waiter {index}" for index in range(5)]
    for place, label in enumerate(labels, start=1):
        futures.append(send(pool, fake, body(label, **QUICK)))
        until(fake, queued(place))
    assert all(future.result().status_code == 200 for future in futures)
    served = sorted(labels, key=lambda label: recorded(fake, label).slot_at or 0)
    assert served == labels
    assert stats(fake).max_in_flight == 1


def test_a_waiting_request_is_sent_nothing_until_it_has_a_slot(make_fake, pool):
    fake = make_fake(num_parallel=1)
    holder = hold_a_slot(pool, fake)[0]
    with open_raw(fake, body("waiter", stream=True, **QUICK)) as sock:
        until(fake, lambda model: model.queued == 1)
        sock.settimeout(HOLD / 2)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # not even the status line
        sock.settimeout(WAIT)
        assert sock.recv(12) == b"HTTP/1.1 200"
    assert holder.result().status_code == 200


def test_a_client_gone_while_waiting_leaves_the_queue_at_once_and_never_runs(make_fake, pool):
    fake = make_fake(num_parallel=1)
    holder = hold_a_slot(pool, fake)[0]
    behind = send(pool, fake, body("behind", **QUICK))
    until(fake, lambda model: model.queued == 1)
    with open_raw(fake, body("gone", stream=True, **QUICK)):
        until(fake, lambda model: model.queued == 2)
    until(fake, lambda model: model.queued == 1)
    assert stats(fake).in_flight == 1  # it left the queue, it was not served: the holder still runs
    assert holder.result().status_code == 200
    assert behind.result().status_code == 200
    gone = recorded(fake, "gone")
    assert (gone.slot_at, gone.slot_wait) == (None, None)
    [stream] = fake.streams
    assert stream.client_gone_at is not None
    assert stream.lines_sent == 0
    assert stats(fake).max_in_flight == 1
    # Nobody is left behind it: the next request gets the free slot at once.
    post(fake, body("next", **QUICK)).raise_for_status()
    assert (recorded(fake, "next").slot_wait or 0) < EXACT


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize(
    ("fault", "timeout"),
    [("error_after", 10), ("reset_after", 10), ("hang_after", 2 * HOLD)],
    ids=["error", "reset", "hang-until-the-client-gives-up"],
)
def test_a_slot_is_given_back_however_the_request_ends(make_fake, pool, fault, timeout, stream):
    fake = make_fake(num_parallel=1)

    def faulty() -> None:
        options: dict[str, Any] = {"tokens": 3, "interval": HOLD, fault: 1}
        payload = body("faulty", stream=stream, **options)
        with contextlib.suppress(httpx.HTTPError):  # the reset, or the client's own timeout on a hung model
            post(fake, payload, timeout=timeout).read()

    ended = pool.submit(faulty)
    until(fake, lambda model: model.in_flight == 1)
    waiter = send(pool, fake, body("waiter", **QUICK))
    until(fake, queued(1))
    assert waiter.result().status_code == 200
    ended.result()
    until(fake, lambda model: model.in_flight == 0 and model.queued == 0)
    # The waiter got the slot when the faulty request ended, after its first token, and not before.
    assert (recorded(fake, "waiter").slot_at or 0) >= (recorded(fake, "faulty").slot_at or 0) + HOLD - EXACT
    assert stats(fake).max_in_flight == 1


def test_fake_load_counts_as_load_time_and_holds_no_slot(make_fake, pool):
    fake = make_fake(num_parallel=1)
    slow = send(pool, fake, body("slow", **QUICK, load=HOLD))
    fake.wait_until(lambda: bool(fake.requests), WAIT)
    post(fake, body("meanwhile", **QUICK)).raise_for_status()
    assert (recorded(fake, "meanwhile").slot_wait or 0) < EXACT
    assert final(slow.result())["load_duration"] / 1e9 >= HOLD
    assert stats(fake).loads == 0  # the model was loaded all along


def test_the_openai_surfaces_wait_for_the_same_slots(make_fake, pool):
    fake = make_fake(num_parallel=1)
    holder = hold_a_slot(pool, fake)[0]
    calls: dict[str, dict[str, Any]] = {
        "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "chat"}]},
        "/v1/completions": {"model": MODEL, "prompt": "completion"},
        "/v1/responses": {"model": MODEL, "input": "response"},
        "/v1/embeddings": {"model": MODEL, "input": "embedding"},
    }
    futures = {path: send(pool, fake, payload, path) for path, payload in calls.items()}
    until(fake, lambda model: model.queued == len(calls))
    assert holder.result().status_code == 200
    answers = {path: future.result() for path, future in futures.items()}
    assert all(answer.status_code == 200 for answer in answers.values())
    assert stats(fake).max_in_flight == 1
    assert all(request.slot_wait for request in fake.requests if request.path.startswith("/v1/"))
    # As in Ollama, no durations on the wire there.
    assert not any("duration" in answer.text for answer in answers.values())


def test_two_instances_are_two_hosts(make_fake, pool):
    busy, idle = make_fake(num_parallel=1), make_fake(num_parallel=1)
    holder = hold_a_slot(pool, busy)[0]
    idle.unload(OTHER)
    post(idle, body("elsewhere", **QUICK)).raise_for_status()
    assert (recorded(idle, "elsewhere").slot_wait or 0) < EXACT
    assert stats(busy).in_flight == 1
    assert set(ps_names(busy)) == {MODEL, OTHER}
    assert ps_names(idle) == [MODEL]
    assert holder.result().status_code == 200


# Loads and /api/ps


def test_a_new_fake_and_a_reset_one_have_the_default_models_loaded(make_fake):
    fake = make_fake()
    assert set(ps_names(fake)) == {MODEL, OTHER}
    fake.unload_all()
    assert ps_names(fake) == []
    fake.reset()
    assert set(ps_names(fake)) == {MODEL, OTHER}
    [entry] = [model for model in httpx.get(fake.url + "/api/ps").json()["models"] if model["name"] == MODEL]
    assert set(entry) == {
        "name",
        "model",
        "size",
        "digest",
        "details",
        "expires_at",
        "size_vram",
        "context_length",
    }


def test_concurrent_requests_for_a_cold_model_wait_for_one_load(make_fake, pool):
    load = 0.5  # three loads one after the other would take 1.5 s: room for a busy machine below that
    fake = make_fake(load_seconds=load)
    fake.unload_all()
    started = time.monotonic()
    futures = [send(pool, fake, body(f"cold {index}", **QUICK)) for index in range(3)]
    until(fake, lambda model: model.loading)
    assert ps_names(fake) == []  # not while it loads
    answers = [future.result() for future in futures]
    assert time.monotonic() - started < 2 * load
    assert stats(fake).loads == 1
    for answer in answers:
        assert load - OUTSIDE <= final(answer)["load_duration"] / 1e9 <= load + OUTSIDE
    assert ps_names(fake) == [MODEL]
    warm = final(post(fake, body("warm", **QUICK)))
    assert warm["load_duration"] / 1e9 < EXACT
    assert stats(fake).loads == 1


def test_a_model_unloaded_is_loaded_again_by_its_next_request(make_fake):
    fake = make_fake(load_seconds=0.05)
    fake.unload(MODEL)
    assert ps_names(fake) == [OTHER]
    post(fake, body("first", **QUICK)).raise_for_status()
    fake.unload(MODEL)
    post(fake, body("second", **QUICK)).raise_for_status()
    assert stats(fake).loads == 2


def test_the_least_recently_used_idle_model_makes_room(make_fake, pool):
    fake = make_fake(max_loaded_models=1, load_seconds=0.05)
    fake.unload_all()
    post(fake, body("first", MODEL, **QUICK)).raise_for_status()
    post(fake, body("second", OTHER, **QUICK)).raise_for_status()
    assert ps_names(fake) == [OTHER]
    # A model in use is never unloaded: the load waits until it is idle.
    holder = send(pool, fake, body("holder", OTHER, **HOLDING))
    until(fake, lambda model: model.in_flight == 1, OTHER)
    answer = post(fake, body("third", MODEL, **QUICK))
    assert holder.result().status_code == 200
    assert final(answer)["load_duration"] / 1e9 >= HOLD / 2
    assert ps_names(fake) == [MODEL]
    assert (stats(fake).loads, stats(fake, OTHER).loads) == (2, 1)


def test_stopping_during_a_load_ends_it(make_fake, pool):
    fake = make_fake(load_seconds=30)
    fake.unload_all()
    answer = send(pool, fake, body("cold", **QUICK))
    until(fake, lambda model: model.loading)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 2
    with pytest.raises(httpx.HTTPError):
        answer.result()


# The final counters


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
def test_the_counters_leave_exactly_the_wait_for_a_slot(make_fake, pool, path, stream):
    per_token, prompt = 0.002, "x" * 40  # 10 tokens: 20 ms of prompt evaluation
    fake = make_fake(num_parallel=1, prompt_eval_per_token=per_token)

    def call(label: str) -> dict[str, Any]:
        options = {"fake_tokens": 3, "fake_interval": 0.05}
        payload: dict[str, Any] = {"model": MODEL, "stream": stream, "options": options}
        if path == "/api/chat":
            payload["messages"] = [{"role": "user", "content": prompt + label}]
        else:
            payload["prompt"] = prompt + label
        return final(post(fake, payload, path))

    first = pool.submit(call, "1")
    until(fake, lambda model: model.in_flight == 1)
    sent = time.monotonic()
    second = call("2")
    served = [first.result(), second]
    waits = [request.slot_wait for request in fake.requests]
    for counters, wait in zip(served, waits, strict=True):
        assert wait is not None
        assert abs(unexplained(counters) - wait) < EXACT
        assert per_token * 10 <= counters["prompt_eval_duration"] / 1e9 < per_token * 10 + OUTSIDE
        assert 3 * 0.05 <= counters["eval_duration"] / 1e9 < 3 * 0.05 + OUTSIDE
        assert counters["prompt_eval_count"] == 10
        assert counters["eval_count"] == 3
    assert unexplained(served[0]) < EXACT
    # What the second waited, seen from outside: from its sending until the first's prompt and tokens ended.
    first_slot = fake.requests[0].slot_at or 0
    first_work = (served[0]["prompt_eval_duration"] + served[0]["eval_duration"]) / 1e9
    assert abs(unexplained(served[1]) - (first_slot + first_work - sent)) < OUTSIDE


def test_an_embedding_counts_its_wait_for_a_slot_in_its_total(make_fake, pool):
    per_token = 0.01
    fake = make_fake(num_parallel=1, prompt_eval_per_token=per_token)
    holder = hold_a_slot(pool, fake)[0]
    answer = post(fake, {"model": MODEL, "input": "x" * 20}, "/api/embed").json()
    wait = recorded(fake, "x" * 20).slot_wait
    assert holder.result().status_code == 200
    assert wait is not None and wait >= HOLD - OUTSIDE
    assert answer["prompt_eval_count"] == 5
    after_load = (answer["total_duration"] - answer["load_duration"]) / 1e9
    assert wait + 5 * per_token <= after_load < wait + 5 * per_token + OUTSIDE

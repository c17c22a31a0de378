"""Several Ollama hosts behind one gateway: routing by model and by free slot, failover, ejection, slots
never exceeded, slots learned, merged model lists. The hosts are test doubles that schedule as Ollama does
(tests/fake_ollama.py: slots per model behind a hidden FIFO)."""

import concurrent.futures
import hashlib
import json
import time
from collections.abc import Callable

import httpx
import pytest

from fleet.hosts import canonical_model
from tests.fake_ollama import FakeOllama, default_models
from tests.processes import free_port
from tests.servers import RunningGateway, add_user
from tests.streams import chat_body

MODEL = "llama3.2:1b"
OTHER = "llava:7b"


@pytest.fixture
def hosts(make_fake: Callable[..., FakeOllama]) -> Callable[..., FakeOllama]:
    """Test doubles of Ollama hosts, e.g. `hosts(num_parallel=2)`."""
    return make_fake


def fleet_gateway(make_gateway, *urls: str, **settings) -> RunningGateway:
    gateway = make_gateway(ollama_url=",".join(urls), **settings)
    gateway.run(gateway.services.fleet.check_now())
    return gateway


def only(fake: FakeOllama, *names: str) -> None:
    fake.models = [entry for entry in default_models() if entry["name"] in names]


def chats(fake: FakeOllama) -> list[str | None]:
    return [request.model for request in fake.requests if request.path == "/api/chat"]


def post_chats(
    gateway: RunningGateway, count: int, headers: dict | None = None, **options
) -> list[httpx.Response]:
    headers = headers or gateway.admin_headers()

    def one(_: int) -> httpx.Response:
        body = {**chat_body(**options), "stream": False}
        return httpx.post(f"{gateway.url}/api/chat", json=body, headers=headers, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_requests_go_to_a_host_that_holds_the_model(make_gateway, hosts):
    first, second = hosts(), hosts()
    only(first, MODEL)
    only(second, OTHER)
    gateway = fleet_gateway(make_gateway, first.url, second.url)
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
        for _ in range(4):
            assert http.post("/api/chat", json={**chat_body(MODEL), "stream": False}).status_code == 200
            assert http.post("/api/chat", json={**chat_body(OTHER), "stream": False}).status_code == 200
    assert chats(first) == [MODEL] * 4
    assert chats(second) == [OTHER] * 4


def test_a_host_with_the_model_loaded_and_a_slot_free_is_preferred(make_gateway, hosts):
    warm, cold = hosts(num_parallel=2), hosts(num_parallel=2)
    cold.unload_all()
    gateway = fleet_gateway(make_gateway, warm.url, cold.url, ollama_parallel=2)
    # One at a time: the warm host always has a free slot.
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
        for _ in range(6):
            assert http.post("/api/chat", json={**chat_body(), "stream": False}).status_code == 200
    assert len(chats(warm)) == 6
    assert chats(cold) == []
    # Three at once: the third goes to the host that can load the model, rather than wait.
    responses = post_chats(gateway, 3, interval=0.1)
    assert [response.status_code for response in responses] == [200] * 3
    assert len(chats(cold)) == 1
    assert cold.model_stats(MODEL).loads == 1


def test_the_gateway_never_sends_a_host_more_than_its_slots(make_gateway, hosts):
    host = hosts(num_parallel=2)
    gateway = fleet_gateway(make_gateway, host.url, ollama_parallel=2)
    responses = post_chats(gateway, 10, tokens=5, interval=0.03)
    assert [response.status_code for response in responses] == [200] * 10
    stats = host.model_stats(MODEL)
    assert stats.max_in_flight == 2
    # Nothing waited inside Ollama: the gateway held the rest.
    assert max(request.slot_wait or 0 for request in host.requests) < 0.02
    assert gateway.services.fleet.scheduler.inflight_by_slot() == {}


def test_a_host_that_dies_before_answering_costs_no_client_an_error(make_gateway, hosts):
    alive = hosts()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gateway = make_gateway(ollama_url=f"{dead},{alive.url}")  # not checked: the gateway finds out by trying
    responses = [
        httpx.post(
            f"{gateway.url}/api/chat",
            json={**chat_body(), "stream": False},
            headers=gateway.admin_headers(),
            timeout=30,
        )
        for _ in range(8)
    ]
    assert [response.status_code for response in responses] == [200] * 8
    assert len(chats(alive)) == 8


def test_a_host_that_fails_fast_is_ejected_rather_than_sent_more(make_gateway, hosts):
    good, busy = hosts(), hosts()
    busy.set_busy(True)  # Ollama's 503 "server busy", at once
    # Not checked first (the double is busy on every path, where Ollama's model list would still answer):
    # the gateway learns it from the requests themselves.
    gateway = make_gateway(ollama_url=f"{busy.url},{good.url}")
    for host in gateway.services.fleet.hosts:
        host.loaded = frozenset({canonical_model(MODEL)})  # as far as the gateway knows, equally good choices
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
        statuses = [
            http.post("/api/chat", json={**chat_body(tokens=1), "stream": False}).status_code
            for _ in range(30)
        ]
    assert statuses == [200] * 30
    # Ties are broken at random, so the busy host is tried early; after its first 503 it is out of service
    # (a trial after its back-off at most), rather than the least loaded host forever.
    assert 1 <= len(busy.requests) <= 2
    shown = {host["url"]: host for host in gateway.services.fleet.snapshot()}
    assert shown[busy.url]["healthy"] is False
    assert "503" in shown[busy.url]["problem"] and "busy" in shown[busy.url]["problem"]


def test_slots_are_learned_from_ollamas_timings_when_not_configured(make_gateway, hosts, caplog):
    host = hosts(num_parallel=2)
    gateway = fleet_gateway(make_gateway, host.url)
    # Slots unknown: all eight go through at once, and six of them wait inside Ollama.
    first = post_chats(gateway, 8, tokens=4, interval=0.05)
    assert [response.status_code for response in first] == [200] * 8
    shown = gateway.services.fleet.snapshot()[0]["capacity"][MODEL]
    assert (shown["capacity"], shown["source"]) == (2, "learned")
    assert any("runs 2 requests at once" in record.getMessage() for record in caplog.records)
    # From now on the gateway holds the rest itself.
    host.reset()
    host.num_parallel = 2
    second = post_chats(gateway, 8, tokens=4, interval=0.05)
    assert [response.status_code for response in second] == [200] * 8
    assert host.model_stats(MODEL).max_in_flight == 2
    assert max(request.slot_wait or 0 for request in host.requests) < 0.02


def test_model_lists_merge_every_host_each_model_once(make_gateway, hosts):
    first, second = hosts(), hosts()
    only(first, MODEL)
    gateway = fleet_gateway(make_gateway, first.url, second.url)
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
        tags = [model["name"] for model in http.get("/api/tags").json()["models"]]
        openai = [model["id"] for model in http.get("/v1/models").json()["data"]]
    assert sorted(tags) == [MODEL, OTHER]
    assert sorted(openai) == [MODEL, OTHER]


def test_model_management_goes_to_the_host_named(make_gateway, hosts):
    first, second = hosts(), hosts()
    gateway = fleet_gateway(make_gateway, first.url, second.url)
    names = [host["name"] for host in gateway.services.fleet.snapshot()]
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30) as http:
        unnamed = http.post("/api/pull", json={"model": "qwen3:0.6b", "stream": False})
        assert unnamed.status_code == 400
        assert "X-Ollama-Host" in unnamed.json()["error"]
        named = http.post(
            "/api/pull", json={"model": "qwen3:0.6b", "stream": False}, headers={"X-Ollama-Host": names[1]}
        )
    assert named.status_code == 200
    assert [request.path for request in second.requests if request.path == "/api/pull"] == ["/api/pull"]
    assert not [request for request in first.requests if request.path == "/api/pull"]


def test_a_request_waits_in_the_gateway_no_longer_than_the_queue_timeout(make_gateway, hosts):
    host = hosts(num_parallel=1)
    gateway = fleet_gateway(make_gateway, host.url, ollama_parallel=1, queue_timeout_interactive=0.3)
    started = time.monotonic()
    responses = post_chats(gateway, 2, tokens=10, interval=0.1)
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 503]
    refused = next(response for response in responses if response.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert "no slot" in refused.json()["error"]
    assert time.monotonic() - started < 5
    assert len(chats(host)) == 1


def test_a_pull_on_every_host_streams_each_hosts_progress_then_one_success(make_gateway, hosts):
    first, second = hosts(), hosts()
    gateway = fleet_gateway(make_gateway, first.url, second.url)
    names = [host["name"] for host in gateway.services.fleet.snapshot()]
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30) as http:
        answer = http.post("/api/pull", json={"model": "qwen3:0.6b"}, headers={"X-Ollama-Host": "all"})
    assert answer.status_code == 200
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert lines[-1] == {"status": "success"}
    assert [line["status"] for line in lines if line["status"].startswith("success on")] == [
        f"success on {name}" for name in names
    ]
    assert {line["host"] for line in lines[:-1]} == set(names)
    for fake in (first, second):
        assert any(entry["name"] == "qwen3:0.6b" for entry in fake.models)


def test_a_delete_on_every_host_says_which_host_failed(make_gateway, hosts):
    first, second = hosts(), hosts()
    only(second, OTHER)  # the second host has no llama3.2:1b to delete
    gateway = fleet_gateway(make_gateway, first.url, second.url)
    second_name = gateway.services.fleet.snapshot()[1]["name"]
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30) as http:
        answer = http.request(
            "DELETE", "/api/delete", json={"model": MODEL}, headers={"X-Ollama-Host": "all"}
        )
    assert answer.status_code == 404
    assert answer.json()["error"].startswith(f"{second_name}: ")
    assert not any(entry["name"] == MODEL for entry in first.models)


def test_a_blob_goes_to_one_named_host(make_gateway, hosts):
    first, second = hosts(), hosts()
    gateway = fleet_gateway(make_gateway, first.url, second.url)
    digest = "sha256:" + hashlib.sha256(b"blob").hexdigest()
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30) as http:
        refused = http.post(f"/api/blobs/{digest}", content=b"blob", headers={"X-Ollama-Host": "all"})
    assert refused.status_code == 400
    assert "one host" in refused.json()["error"]


def test_health_counts_the_hosts_in_service(make_gateway, hosts):
    alive = hosts()
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = fleet_gateway(make_gateway, alive.url, dead)  # the check finds the second one down
    health = httpx.get(f"{gateway.url}/health").json()
    assert (health["status"], health["hosts"], health["hosts_in_service"]) == ("ok", 2, 1)


def test_the_gateways_own_headers_stay_in_the_gateway(make_gateway, hosts):
    host = hosts()
    gateway = fleet_gateway(make_gateway, host.url)
    headers = {**gateway.admin_headers(), "X-Priority": "batch", "X-Ollama-Host": "all"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as http:
        assert http.post("/api/chat", json={**chat_body(), "stream": False}).status_code == 200
        assert http.post("/api/pull", json={"model": "qwen3:0.6b", "stream": False}).status_code == 200
    for request in host.requests:
        assert "x-priority" not in {name.lower() for name in request.headers}
        assert "x-ollama-host" not in {name.lower() for name in request.headers}


def test_a_draining_host_finishes_what_it_runs_and_takes_nothing_new(make_gateway, hosts):
    draining, other = hosts(), hosts()
    gateway = fleet_gateway(make_gateway, draining.url, other.url)
    headers = gateway.admin_headers()
    host = next(host for host in gateway.services.fleet.hosts if host.upstream.public_url == draining.url)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # Requests already running on it when it starts draining finish there.
        running = [pool.submit(slow_chat, gateway, headers) for _ in range(4)]
        deadline = time.monotonic() + 5
        while sum(fake.model_stats(MODEL).in_flight for fake in (draining, other)) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        host.config.draining = True
        started_there = len(chats(draining))
        assert started_there >= 1
        later = [pool.submit(slow_chat, gateway, headers) for _ in range(6)]
        assert [future.result() for future in running + later] == [200] * 10
    assert len(chats(draining)) == started_there
    assert len(chats(other)) == 10 - started_there


def slow_chat(gateway: RunningGateway, headers: dict[str, str]) -> int:
    body = {**chat_body(tokens=5, interval=0.05), "stream": False}
    return httpx.post(f"{gateway.url}/api/chat", json=body, headers=headers, timeout=30).status_code


def test_embeddings_teach_no_slots(make_gateway, hosts):
    # An embedding's answer says nothing of how long the model worked: its time would all look like a wait.
    host = hosts(num_parallel=4, prompt_eval_per_token=0.02)
    gateway = fleet_gateway(make_gateway, host.url)
    body = {"model": MODEL, "input": "one two three four five six seven eight nine ten"}
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30) as http:
        for _ in range(4):
            assert http.post("/api/embed", json=body).status_code == 200
    assert gateway.services.fleet.snapshot()[0]["capacity"][MODEL]["capacity"] is None


def test_a_request_ollama_refuses_at_once_does_not_take_its_host_out_of_service(make_gateway, hosts):
    # Ollama answers 500 at once to a request it can't run (a template that does not parse): that is the
    # request's fault, and no user may take a host out of service for everyone.
    first, second = hosts(), hosts()
    gateway = fleet_gateway(make_gateway, first.url, second.url)
    token = add_user(gateway, "mallory@example.com")
    bad = {**chat_body(), "stream": False, "options": {"fake_error_after": 0}}
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        for _ in range(4):
            assert http.post("/api/chat", json=bad).status_code == 500
    assert all(host["healthy"] for host in gateway.services.fleet.snapshot())


def test_a_model_family_ollama_runs_one_at_a_time_is_held_to_one_slot(make_gateway, hosts):
    # OLLAMA_PARALLEL says 2, but Ollama forces one slot on some families: the gateway learns that ceiling.
    host = hosts(num_parallel=2, model_parallel={OTHER: 1})
    gateway = fleet_gateway(make_gateway, host.url, ollama_parallel=2)
    for _ in range(2):
        responses = post_chats(gateway, 6, model=OTHER, tokens=4, interval=0.05)
        assert [response.status_code for response in responses] == [200] * 6
    shown = gateway.services.fleet.snapshot()[0]["capacity"][OTHER]
    assert (shown["capacity"], shown["source"]) == (1, "learned")
    host.reset()
    host.num_parallel, host.model_parallel = 2, {OTHER: 1}
    responses = post_chats(gateway, 6, model=OTHER, tokens=4, interval=0.05)
    assert [response.status_code for response in responses] == [200] * 6
    assert max(request.slot_wait or 0 for request in host.requests) < 0.02

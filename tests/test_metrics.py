"""GET /metrics: only admins and METRICS_TOKEN read it; its counters agree with the requests made and the
usage recorded; the fleet's gauges show what runs and waits; model labels stay bounded; and with
PROMETHEUS_MULTIPROC_DIR one scrape sums every process."""

import secrets
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from observe.labels import OTHER, ModelLabels
from observe.metrics import MODELS, REGISTRY, record_usage
from tests.fake_ollama import FakeOllama
from tests.processes import REPO
from tests.servers import RunningGateway, add_user
from tests.streams import chat_body
from usage.records import Outcome, UsageRecord

MODEL = "llama3.2:1b"
METRICS_TOKEN = secrets.token_hex(32)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _scrape(gateway: RunningGateway) -> Samples:
    response = httpx.get(f"{gateway.url}/metrics", headers=gateway.admin_headers())
    assert response.status_code == 200
    return _parse(response.text)


def _record(**fields) -> UsageRecord:
    values = {
        "at": datetime.now(UTC),
        "user_id": 1,
        "key_id": None,
        "surface": "/api/chat",
        "model": MODEL,
        "band": "interactive",
        "outcome": Outcome.COMPLETED,
        "status": 200,
        "host": "gpu-1",
        **fields,
    }
    return UsageRecord(**values)


def _registry_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- who may read it --------------------------------------------------------------------------------------


def test_metrics_refuse_anonymous_readers(anonymous):
    response = anonymous.get("/metrics")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "error" in response.json()


def test_metrics_refuse_a_user_who_is_not_an_admin(gateway):
    token = add_user(gateway, f"reader-{time.monotonic_ns()}@example.com")
    response = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert "error" in response.json()


def test_metrics_for_an_admin_in_prometheus_text_format(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert "gateway_requests_total" in response.text


def test_metrics_for_an_admins_api_key(client, gateway):
    key = client.post("/keys", json={"name": "prometheus"}).json()["key"]
    response = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200


@pytest.fixture
def with_token(make_gateway) -> RunningGateway:
    return make_gateway(metrics_token=METRICS_TOKEN)


def test_metrics_for_the_metrics_token(with_token):
    response = httpx.get(f"{with_token.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    assert "gateway_requests_total" in response.text


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(f"Bearer {METRICS_TOKEN[:-1]}x", id="one-character-off"),
        pytest.param(f"Bearer {METRICS_TOKEN[:-1]}", id="prefix"),
        pytest.param(f"Bearer {METRICS_TOKEN}0", id="longer"),
        pytest.param(f"Token {METRICS_TOKEN}", id="another-scheme"),
        pytest.param("Bearer \xe9t\xe9", id="not-ascii"),
    ],
)
def test_metrics_refuse_a_wrong_token(with_token, authorization):
    response = httpx.get(
        f"{with_token.url}/metrics", headers={"Authorization": authorization.encode("latin-1")}
    )
    assert response.status_code == 401


def test_metrics_token_unset_refuses_any_bearer_but_an_admins(gateway):
    response = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 401


# -- what it counts ---------------------------------------------------------------------------------------


def test_metrics_requests_total_agrees_with_the_requests_made(gateway, client, anonymous):
    before = _scrape(gateway)
    for _ in range(3):
        assert client.get("/api/tags").status_code == 200
    assert anonymous.get("/api/tags").status_code == 401
    assert client.get("/keys/424242").status_code == 405  # the route's path, another method
    for _ in range(2):
        assert client.get(f"/no-such-page-{secrets.token_hex(4)}").status_code == 404
    time.sleep(0.1)  # each is counted just after its answer's last byte
    after = _scrape(gateway)

    def delta(surface: str, status: str) -> float:
        name = "gateway_requests_total"
        return _value(after, name, surface=surface, status=status) - _value(
            before, name, surface=surface, status=status
        )

    assert delta("/api/tags", "200") == 3
    assert delta("/api/tags", "401") == 1
    assert delta("/keys/{key_id}", "405") == 1
    assert delta("other", "404") == 2
    assert delta("/metrics", "200") == 1  # the first scrape, counted once its answer was sent


def test_record_usage_moves_tokens_slot_time_first_byte_queue_wait_and_loads():
    MODELS.admit(MODEL)
    labels = {"model": MODEL, "host": "gpu-1"}
    before = {
        "prompt": _registry_value("gateway_tokens_total", **labels, kind="prompt"),
        "completion": _registry_value("gateway_tokens_total", **labels, kind="completion"),
        "slot": _registry_value("gateway_slot_seconds_total", **labels),
        "ttfb_count": _registry_value("gateway_time_to_first_byte_seconds_count", **labels),
        "ttfb_sum": _registry_value("gateway_time_to_first_byte_seconds_sum", **labels),
        "ttfb_fast": _registry_value("gateway_time_to_first_byte_seconds_bucket", **labels, le="0.25"),
        "queue_count": _registry_value("gateway_queue_wait_seconds_count", model=MODEL, band="batch"),
        "queue_sum": _registry_value("gateway_queue_wait_seconds_sum", model=MODEL, band="batch"),
        "loads": _registry_value("gateway_model_loads_total", host="gpu-1", model=MODEL),
    }
    record_usage(
        _record(
            band="batch",
            prompt_tokens=7,
            completion_tokens=11,
            slot_seconds=1.5,
            ttfb_seconds=0.2,
            queue_seconds=0.3,
            model_load=True,
        )
    )
    record_usage(_record(band="batch", prompt_tokens=None, completion_tokens=4, queue_seconds=0.1))
    assert _registry_value("gateway_tokens_total", **labels, kind="prompt") - before["prompt"] == 7
    assert _registry_value("gateway_tokens_total", **labels, kind="completion") - before["completion"] == 15
    assert _registry_value("gateway_slot_seconds_total", **labels) - before["slot"] == pytest.approx(1.5)
    ttfb_count = _registry_value("gateway_time_to_first_byte_seconds_count", **labels)
    assert ttfb_count - before["ttfb_count"] == 1  # the second record had no first byte
    ttfb_sum = _registry_value("gateway_time_to_first_byte_seconds_sum", **labels)
    assert ttfb_sum - before["ttfb_sum"] == pytest.approx(0.2)
    ttfb_fast = _registry_value("gateway_time_to_first_byte_seconds_bucket", **labels, le="0.25")
    assert ttfb_fast - before["ttfb_fast"] == 1
    queue_count = _registry_value("gateway_queue_wait_seconds_count", model=MODEL, band="batch")
    assert queue_count - before["queue_count"] == 2
    queue_sum = _registry_value("gateway_queue_wait_seconds_sum", model=MODEL, band="batch")
    assert queue_sum - before["queue_sum"] == pytest.approx(0.4)
    loads = _registry_value("gateway_model_loads_total", host="gpu-1", model=MODEL)
    assert loads - before["loads"] == 1


def test_record_usage_folds_a_model_ollama_never_answered():
    name = f"random-{secrets.token_hex(6)}"
    before = _registry_value("gateway_tokens_total", model=OTHER, host="gpu-1", kind="prompt")
    record_usage(_record(model=name, outcome=Outcome.ERROR, status=404, prompt_tokens=3))
    record_usage(_record(model=name, outcome=Outcome.CANCELLED, prompt_tokens=2))
    after = _registry_value("gateway_tokens_total", model=OTHER, host="gpu-1", kind="prompt")
    assert after - before == 5
    assert name.encode() not in _exposed()


def _exposed() -> bytes:
    return generate_latest(REGISTRY)


def test_model_labels_are_capped():
    labels = ModelLabels(cap=3)
    for name in ("a", "b", "c", "d"):
        labels.admit(name)
    assert [labels.label(name) for name in ("a", "b", "c", "d", "e")] == ["a", "b", "c", OTHER, OTHER]


def test_metrics_random_model_names_asked_through_the_gateway_fold_into_one(gateway, client):
    names = [f"nonsense-{secrets.token_hex(4)}" for _ in range(5)]
    for name in names:
        response = client.post("/api/chat", json={**chat_body(model=name), "stream": False})
        assert response.status_code == 404
    text = client.get("/metrics").text
    for name in names:
        assert name not in text


# -- the fleet's gauges -----------------------------------------------------------------------------------


@pytest.fixture
def one_slot_host() -> Iterator[FakeOllama]:
    with FakeOllama(num_parallel=1) as fake:
        yield fake


def _chat(gateway: RunningGateway, text: str) -> None:
    body = {**chat_body(text=text, tokens=10, interval=0.1), "stream": False}
    httpx.post(f"{gateway.url}/api/chat", json=body, headers=gateway.admin_headers(), timeout=30)


def test_metrics_fleet_gauges_show_a_request_in_flight_and_one_waiting(make_gateway, one_slot_host):
    MODELS.admit(MODEL)  # as a completed answer would have
    gateway = make_gateway(ollama_url=one_slot_host.url, ollama_parallel=1)
    host = next(iter(gateway.services.fleet.hosts)).name
    scheduler = gateway.services.fleet.scheduler
    running = threading.Thread(target=_chat, args=(gateway, "running"))
    running.start()
    _wait_for(lambda: scheduler.inflight_by_slot())
    waiting = threading.Thread(target=_chat, args=(gateway, "waiting"))
    waiting.start()
    _wait_for(lambda: scheduler.waiting()["interactive"] == 1)
    held = _scrape(gateway)
    running.join()
    waiting.join()
    idle = _scrape(gateway)
    assert _value(held, "gateway_inflight", host=host, model=MODEL) == 1
    assert _value(held, "gateway_queue_depth", model=MODEL, band="interactive") == 1
    assert _value(held, "gateway_queue_depth", model=MODEL, band="batch") == 0
    assert _value(held, "gateway_slots", host=host, model=MODEL) == 1
    assert _value(held, "gateway_host_up", host=host) == 1
    assert _value(idle, "gateway_inflight", host=host, model=MODEL) == 0
    assert _value(idle, "gateway_queue_depth", model=MODEL, band="interactive") == 0


def test_metrics_host_up_is_0_for_a_host_out_of_service(make_gateway, unused_port):
    gateway = make_gateway(ollama_url=f"http://127.0.0.1:{unused_port}")
    gateway.run(gateway.services.fleet.check_now())
    host = next(iter(gateway.services.fleet.hosts)).name
    assert _value(_scrape(gateway), "gateway_host_up", host=host) == 0


def _wait_for(condition, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


# -- several processes ------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    from fleet.admission import Fleet, Limits
    from fleet.hosts import HostConfig, Hosts, canonical_model
    from fleet.scheduler import Ask
    from observe.fleet_gauges import shared_fleet_gauges
    from observe.metrics import MODELS, count_request, record_usage
    from upstream.client import UpstreamTimeouts
    from usage.records import Outcome, UsageRecord

    async def main():
        fleet = Fleet(Hosts(UpstreamTimeouts(1, 1, 1)), Limits(), check_seconds=60)
        slots = int(sys.argv[1])
        fleet.hosts.add(HostConfig(id="env-1", name="gpu-1", url="http://127.0.0.1:9", slots=slots))
        assert fleet.scheduler.try_acquire(Ask("1", canonical_model("llama3.2:1b"))) is not None
        count_request("/api/chat", 200)
        record_usage(UsageRecord(
            at=datetime.now(UTC), user_id=1, key_id=None, surface="/api/chat", model="llama3.2:1b",
            band="interactive", outcome=Outcome.COMPLETED, status=200, host="gpu-1",
            prompt_tokens=10, completion_tokens=int(sys.argv[1]),
        ))
        shared_fleet_gauges().publish(fleet, MODELS)
        await fleet.close()

    asyncio.run(main())
    """
)
SCRAPER = "import sys\nfrom observe.metrics import exposition\nsys.stdout.write(exposition().decode())\n"


def _python(code: str, folder: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={"PROMETHEUS_MULTIPROC_DIR": str(folder), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_metrics_several_processes_are_summed_in_one_scrape(tmp_path):
    _python(WORKER, tmp_path, "2")
    _python(WORKER, tmp_path, "3")
    samples = _parse(_python(SCRAPER, tmp_path))
    assert _value(samples, "gateway_requests_total", surface="/api/chat", status="200") == 2
    tokens = {"model": MODEL, "host": "gpu-1"}
    assert _value(samples, "gateway_tokens_total", **tokens, kind="prompt") == 20
    assert _value(samples, "gateway_tokens_total", **tokens, kind="completion") == 5
    assert _value(samples, "gateway_queue_wait_seconds_count", model=MODEL, band="interactive") == 2
    # Each process held one request in flight: summed. Slots: the highest any saw.
    assert _value(samples, "gateway_inflight", host="gpu-1", model=MODEL) == 2
    assert _value(samples, "gateway_slots", host="gpu-1", model=MODEL) == 3
    assert _value(samples, "gateway_host_up", host="gpu-1") == 1


def test_metrics_a_process_that_ends_leaves_its_counts_not_its_gauges(tmp_path):
    forget = WORKER.replace(
        "await fleet.close()",
        "await fleet.close()\n    from observe.metrics import forget_this_process\n    forget_this_process()",
    )
    _python(forget, tmp_path, "2")
    samples = _parse(_python(SCRAPER, tmp_path))
    assert _value(samples, "gateway_requests_total", surface="/api/chat", status="200") == 1
    assert not [name for name, _ in samples if name.startswith(("gateway_inflight", "gateway_slots"))]

"""Ollama hosts at run time (`/admin/hosts`): stored hosts added, changed, drained and removed; OLLAMA_URL's
hosts drained or disabled until the next start and nothing else; stored hosts loaded at start and taken up
from the database at every check; credentials used, never shown."""

import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from fleet.hosts import canonical_model
from tests.databases import execute
from tests.fake_ollama import FakeOllama, default_models
from tests.servers import RunningGateway, add_user, gateway_settings, start_gateway
from tests.streams import chat_body

pytestmark = pytest.mark.storage

MODEL = "llama3.2:1b"
OTHER = "llava:7b"
SECRET = "sekrit-pass"


@pytest.fixture
def hosts() -> Iterator[Callable[..., FakeOllama]]:
    started: list[FakeOllama] = []

    def start(*models: str, **settings) -> FakeOllama:
        fake = FakeOllama(**settings).start()
        if models:
            fake.models = [entry for entry in default_models() if entry["name"] in models]
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


def admin(gateway: RunningGateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30)


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://ops:{SECRET}@")


def chats(fake: FakeOllama) -> int:
    return sum(1 for request in fake.requests if request.path == "/api/chat")


def chat(gateway: RunningGateway, model: str = MODEL) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/api/chat",
        json={**chat_body(model), "stream": False},
        headers=gateway.admin_headers(),
        timeout=30,
    )


def checked(gateway: RunningGateway) -> None:
    """What the periodic check does: the stored hosts read again, every host asked its models."""
    gateway.run(gateway.services.fleet.check_now())


def shown(gateway: RunningGateway) -> dict[str, dict]:
    with admin(gateway) as http:
        return {host["id"]: host for host in http.get("/admin/hosts").json()}


def test_hosts_lists_the_environments_hosts_without_their_credentials(make_gateway, hosts):
    first, second = hosts(), hosts()
    gateway = make_gateway(ollama_url=f"{with_credentials(first.url)},{second.url}", ollama_parallel=2)
    checked(gateway)
    with admin(gateway) as http:
        listed = http.get("/admin/hosts")
    assert listed.status_code == 200
    assert SECRET not in listed.text
    one, two = listed.json()
    assert (one["id"], one["url"], one["source"], one["slots"]) == ("env-1", first.url, "environment", 2)
    assert (two["id"], two["url"]) == ("env-2", second.url)
    assert one["enabled"] and not one["draining"] and one["healthy"]
    assert one["models"] == [MODEL, OTHER]
    assert one["capacity"][MODEL] == {"capacity": 2, "source": "configured", "inflight": 0, "waiting": 0}


def test_an_added_host_takes_work_at_once_with_its_credentials_never_shown(make_gateway, hosts):
    environment, added = hosts(MODEL), hosts(OTHER)
    gateway = make_gateway(ollama_url=environment.url)
    checked(gateway)
    with admin(gateway) as http:
        response = http.post(
            "/admin/hosts", json={"name": "gpu-2", "url": with_credentials(added.url), "slots": 2}
        )
        assert response.status_code == 201, response.text
        host = response.json()
        assert (host["id"], host["name"], host["url"]) == ("h1", "gpu-2", added.url)
        assert (host["source"], host["slots"], host["enabled"], host["draining"]) == (
            "stored",
            2,
            True,
            False,
        )
        # Its check (models, loaded ones) runs at once, in the background.
        added.wait_until(lambda: any(r.path == "/api/ps" for r in added.requests), timeout=5)
        assert chat(gateway, OTHER).status_code == 200
        listed = http.get("/admin/hosts")
    assert SECRET not in response.text and SECRET not in listed.text
    assert chats(added) == 1 and chats(environment) == 0
    sent = next(request for request in added.requests if request.path == "/api/chat")
    assert sent.headers["authorization"].startswith("Basic "), "the credentials are used"
    assert execute(gateway.settings, "SELECT name, url, slots FROM hosts") == [
        ("gpu-2", with_credentials(added.url), 2)
    ]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        pytest.param({"name": "gpu-2", "url": f"ftp://ops:{SECRET}@gpu.lan"}, "url", id="not-http"),
        pytest.param({"name": "gpu-2", "url": f"http://ops:{SECRET}@gpu.lan/?x=1"}, "url", id="query"),
        pytest.param({"name": "gpu-2", "url": f"http://ops:{SECRET}@gpu.lan:0"}, "url", id="port-0"),
        pytest.param({"name": "gpu 2", "url": "http://gpu.lan"}, "name", id="space-in-name"),
        pytest.param({"name": "", "url": "http://gpu.lan"}, "name", id="empty-name"),
        pytest.param({"name": "gpu-2", "url": "http://gpu.lan", "slots": 0}, "slots", id="no-slots"),
        pytest.param({"url": "http://gpu.lan"}, "name", id="no-name"),
    ],
)
def test_an_invalid_new_host_is_422_and_never_echoes_credentials(gateway, body, problem):
    with admin(gateway) as http:
        response = http.post("/admin/hosts", json=body)
    assert response.status_code == 422
    assert set(response.json()) == {"error"}
    assert problem in response.json()["error"]
    assert SECRET not in response.text


@pytest.mark.parametrize(
    ("name", "url", "clash"),
    [
        pytest.param("GPU-2", "http://elsewhere.lan:11434", "named gpu-2", id="same-name-other-case"),
        pytest.param("gpu-3", "http://ops:other@gpu-2.lan:11434/", "already a host: h1", id="same-ollama"),
        pytest.param("gpu-3", "{environment}", "already a host: env-1", id="an-environment-host"),
        pytest.param("h7", "http://elsewhere.lan:11434", "look like a host's id", id="named-like-an-id"),
        pytest.param("env-3", "http://elsewhere.lan:11434", "look like a host's id", id="named-like-env"),
    ],
)
def test_a_host_that_clashes_with_another_is_409(make_gateway, name, url, clash):
    gateway = make_gateway()
    with admin(gateway) as http:
        assert http.post("/admin/hosts", json={"name": "gpu-2", "url": "http://gpu-2.lan:11434"}).is_success
        body = {"name": name, "url": url.format(environment=gateway.settings.ollama_url)}
        response = http.post("/admin/hosts", json=body)
    assert response.status_code == 409
    assert clash in response.json()["error"]
    assert list(shown(gateway)) == ["env-1", "h1"]


@pytest.mark.parametrize(
    ("method", "change", "said"),
    [
        pytest.param("PATCH", {"url": "http://elsewhere.lan:11434"}, "its URL", id="url"),
        pytest.param("PATCH", {"name": "renamed"}, "its URL, and the name made of it", id="name"),
        pytest.param("PATCH", {"slots": 4}, "OLLAMA_PARALLEL", id="slots"),
        pytest.param("PATCH", {"slots": None, "enabled": False}, "OLLAMA_PARALLEL", id="learn-slots"),
        pytest.param("DELETE", None, "taken out of OLLAMA_URL", id="removal"),
    ],
)
def test_an_environment_host_changes_only_enabled_and_draining(make_gateway, method, change, said):
    gateway = make_gateway(ollama_parallel=2)
    with admin(gateway) as http:
        response = http.request(method, "/admin/hosts/env-1", json=change)
    assert response.status_code == 409
    message = response.json()["error"]
    assert message.startswith("env-1 (") and "comes from OLLAMA_URL" in message and said in message
    host = shown(gateway)["env-1"]
    assert (host["enabled"], host["slots"]) == (True, 2), "nothing changed"


def test_an_environment_host_drained_gets_no_new_work_until_the_next_start(tmp_path, hosts):
    first, second = hosts(), hosts()
    settings = gateway_settings(tmp_path / "data", f"{first.url},{second.url}")
    gateway, server = start_gateway(settings)
    try:
        with admin(gateway) as http:
            drained = http.patch("/admin/hosts/env-1", json={"draining": True})
            assert drained.status_code == 200 and drained.json()["draining"] is True
            assert all(chat(gateway).status_code == 200 for _ in range(6))
            assert (chats(first), chats(second)) == (0, 6)
            assert http.patch("/admin/hosts/env-1", json={"draining": False, "enabled": False}).is_success
            assert all(chat(gateway).status_code == 200 for _ in range(3))
            assert chats(first) == 0, "disabled"
    finally:
        server.stop()
    # Not stored: at the next start it is what OLLAMA_URL says.
    gateway, server = start_gateway(settings)
    try:
        host = shown(gateway)["env-1"]
        assert (host["enabled"], host["draining"]) == (True, False)
    finally:
        server.stop()


def test_a_stored_host_is_changed_and_moved(make_gateway, hosts):
    before, after = hosts(), hosts()
    gateway = make_gateway()
    with admin(gateway) as http:
        assert http.post("/admin/hosts", json={"name": "gpu-2", "url": before.url, "slots": 3}).is_success
        renamed = http.patch("/admin/hosts/h1", json={"name": "gpu-two", "draining": True})
        assert renamed.status_code == 200
        assert (renamed.json()["name"], renamed.json()["draining"], renamed.json()["slots"]) == (
            "gpu-two",
            True,
            3,
        )
        learned = http.patch("/admin/hosts/h1", json={"slots": None, "draining": False})
        assert learned.json()["slots"] is None, "null: learn them"
        moved = http.patch("/admin/hosts/h1", json={"url": with_credentials(after.url)})
        assert moved.json()["url"] == after.url and SECRET not in moved.text
        after.wait_until(lambda: any(r.path == "/api/tags" for r in after.requests), timeout=5)
    assert execute(gateway.settings, "SELECT name, url, slots, draining FROM hosts") == [
        ("gpu-two", with_credentials(after.url), None, False)
    ]


@pytest.mark.parametrize("host_id", ["h999", "env-9", "gpu-2", "h0", "h" + "9" * 30])
@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_an_unknown_host_is_404(gateway, method, host_id):
    with admin(gateway) as http:
        response = http.request(method, f"/admin/hosts/{host_id}", json={"draining": True})
    assert response.status_code == 404
    assert response.json() == {"error": "no such host"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/hosts", None),
        ("POST", "/admin/hosts", {"name": "gpu-2", "url": "http://gpu-2.lan:11434"}),
        ("PATCH", "/admin/hosts/env-1", {"draining": True}),
        ("DELETE", "/admin/hosts/env-1", None),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_user_calling_a_host_route_is_403(gateway, method, path, body):
    token = add_user(gateway, f"user-{method.lower()}@example.com")
    response = httpx.request(
        method, f"{gateway.url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 403
    assert set(response.json()) == {"error"}
    assert shown(gateway)["env-1"]["draining"] is False


def test_stored_hosts_come_back_after_a_restart(tmp_path, hosts):
    stored = hosts()
    settings = gateway_settings(tmp_path / "data", hosts().url)
    gateway, server = start_gateway(settings)
    try:
        with admin(gateway) as http:
            for name in ("gone", "gpu-2"):
                url = stored.url if name == "gpu-2" else "http://gone.lan:11434"
                assert http.post("/admin/hosts", json={"name": name, "url": url, "slots": 2}).is_success
            assert http.delete("/admin/hosts/h1").status_code == 204
    finally:
        server.stop()
    gateway, server = start_gateway(settings)
    try:
        listed = shown(gateway)
        assert list(listed) == ["env-1", "h2"], "the environment's first; a removed host's id is not reused"
        assert (listed["h2"]["name"], listed["h2"]["source"], listed["h2"]["slots"]) == ("gpu-2", "stored", 2)
        with admin(gateway) as http:
            added = http.post("/admin/hosts", json={"name": "gpu-3", "url": "http://gpu-3.lan:11434"})
        assert added.json()["id"] == "h3"
    finally:
        server.stop()


def test_hosts_changed_in_the_database_are_taken_up_at_the_next_check(make_gateway, hosts):
    elsewhere = hosts(OTHER)
    gateway = make_gateway(ollama_url=hosts(MODEL).url)
    settings = gateway.settings
    # As manage.py or another replica would: straight in the database.
    execute(
        settings,
        "INSERT INTO hosts (name, url, enabled, draining, slots) VALUES (:name, :url, true, false, 1)",
        {"name": "gpu-2", "url": elsewhere.url},
    )
    assert "h1" not in shown(gateway)
    checked(gateway)
    assert shown(gateway)["h1"]["models"] == [OTHER]
    assert chat(gateway, OTHER).status_code == 200 and chats(elsewhere) == 1
    execute(settings, "UPDATE hosts SET draining = true, slots = NULL")
    checked(gateway)
    assert (shown(gateway)["h1"]["draining"], shown(gateway)["h1"]["slots"]) == (True, None)
    execute(settings, "DELETE FROM hosts")
    checked(gateway)
    assert list(shown(gateway)) == ["env-1"]


def test_a_host_removed_while_a_stream_runs_lets_it_finish_and_gives_its_slot_back(make_gateway, hosts):
    stored = hosts(MODEL)
    gateway = make_gateway()
    with admin(gateway) as http:
        assert http.post("/admin/hosts", json={"name": "gpu-2", "url": stored.url, "slots": 1}).is_success
        assert http.patch("/admin/hosts/env-1", json={"enabled": False}).is_success
    stored.wait_until(lambda: any(r.path == "/api/ps" for r in stored.requests), timeout=5)
    lines: list[dict] = []

    def stream() -> None:
        body = chat_body(MODEL, tokens=20, interval=0.05)
        with (
            httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30) as http,
            http.stream("POST", "/api/chat", json=body) as response,
        ):
            lines.extend(json.loads(line) for line in response.iter_lines())

    running = threading.Thread(target=stream)
    running.start()
    deadline = time.monotonic() + 5
    while not gateway.services.fleet.scheduler.inflight_by_slot() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gateway.services.fleet.scheduler.inflight_by_slot() == {("h1", canonical_model(MODEL)): 1}
    with admin(gateway) as http:
        assert http.delete("/admin/hosts/h1").status_code == 204
        assert "h1" not in {host["id"] for host in http.get("/admin/hosts").json()}
    running.join(timeout=10)
    assert lines and lines[-1]["done"] is True, "the stream ran to its end"
    assert len(lines) == 21
    assert gateway.services.fleet.scheduler.inflight_by_slot() == {}
    assert chats(stored) == 1


def test_a_host_removed_elsewhere_is_404_here_and_gone_at_once(make_gateway):
    gateway = make_gateway()
    with admin(gateway) as http:
        assert http.post("/admin/hosts", json={"name": "gpu-2", "url": "http://gpu-2.lan:11434"}).is_success
        execute(gateway.settings, "DELETE FROM hosts")  # manage.py remove-host, before the next check
        assert http.patch("/admin/hosts/h1", json={"draining": True}).status_code == 404
    assert list(shown(gateway)) == ["env-1"]


def test_a_stored_host_whose_url_cant_be_used_is_left_out_at_start_and_at_checks(tmp_path, caplog):
    settings = gateway_settings(tmp_path / "data", "http://127.0.0.1:9")
    gateway, server = start_gateway(settings)
    try:
        insert = "INSERT INTO hosts (name, url, enabled, draining) VALUES (:name, :url, true, false)"
        execute(settings, insert, {"name": "by-hand", "url": "gpu-2.lan:11434"})  # no scheme
        checked(gateway)
        assert list(shown(gateway)) == ["env-1"]
    finally:
        server.stop()
    gateway, server = start_gateway(settings)
    try:
        assert list(shown(gateway)) == ["env-1"]
    finally:
        server.stop()
    assert "stored Ollama host 1 (by-hand) left out: its URL can't be used" in caplog.text

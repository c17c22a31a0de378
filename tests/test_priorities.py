"""Who waits behind whom in the fair queue: batch API keys (their requests are batch whatever they say; any
request may lower itself with X-Priority, never raise itself), and per-person caps an admin sets."""

import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from fleet.scheduler import Ask, Band, Scheduler
from tests.fake_ollama import FakeOllama
from tests.servers import RunningGateway, add_user
from tests.streams import chat_body

pytestmark = pytest.mark.storage

MODEL = "llama3.2:1b"


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def new_key(gateway: RunningGateway, headers: dict[str, str], **fields) -> dict:
    response = httpx.post(f"{gateway.url}/keys", json={"name": "script", **fields}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def asks_of(gateway: RunningGateway) -> list[Ask]:
    """Every ask the fleet's scheduler is given from now on."""
    scheduler = gateway.services.fleet.scheduler
    original = scheduler.try_acquire
    asks: list[Ask] = []

    def recording(ask: Ask):
        asks.append(ask)
        return original(ask)

    scheduler.try_acquire = recording
    return asks


def chat(gateway: RunningGateway, headers: dict[str, str], text: str = "Hi", **options) -> httpx.Response:
    body = {**chat_body(MODEL, text, **options), "stream": False}
    return httpx.post(f"{gateway.url}/api/chat", json=body, headers=headers, timeout=30)


# Batch keys


def test_a_key_is_interactive_unless_made_batch_and_says_so_everywhere(gateway):
    admin = gateway.admin_headers()
    plain = new_key(gateway, admin)
    batch = new_key(gateway, admin, name="nightly", priority="batch")
    assert (plain["priority"], batch["priority"]) == ("interactive", "batch")
    mine = {key["id"]: key["priority"] for key in httpx.get(f"{gateway.url}/keys", headers=admin).json()}
    everyone = httpx.get(f"{gateway.url}/admin/keys", headers=admin).json()
    assert mine[batch["id"]] == "batch" and mine[plain["id"]] == "interactive"
    assert {key["id"]: key["priority"] for key in everyone}[batch["id"]] == "batch"


@pytest.mark.parametrize("priority", ["urgent", "", "BATCH", None])
def test_a_key_of_an_unknown_priority_is_422(gateway, priority):
    response = httpx.post(
        f"{gateway.url}/keys", json={"name": "k", "priority": priority}, headers=gateway.admin_headers()
    )
    assert response.status_code == 422
    assert "priority" in response.json()["error"]


@pytest.mark.parametrize(
    ("credential", "header", "band"),
    [
        pytest.param("token", None, Band.INTERACTIVE, id="token"),
        pytest.param("token", "batch", Band.BATCH, id="token-lowered"),
        pytest.param("interactive-key", None, Band.INTERACTIVE, id="interactive-key"),
        pytest.param("interactive-key", "batch", Band.BATCH, id="interactive-key-lowered"),
        pytest.param("batch-key", None, Band.BATCH, id="batch-key"),
        pytest.param("batch-key", "interactive", Band.BATCH, id="batch-key-never-raised"),
    ],
)
def test_a_requests_band_comes_from_its_key_and_may_only_be_lowered(
    make_gateway, ollama, credential, header, band
):
    gateway = make_gateway()
    token = add_user(gateway, "ada@example.com")
    keys = {
        "interactive-key": new_key(gateway, bearer(token)),
        "batch-key": new_key(gateway, bearer(token), priority="batch"),
    }
    headers = bearer(keys[credential]["key"] if credential in keys else token)
    if header is not None:
        headers["X-Priority"] = header
    asks = asks_of(gateway)
    assert chat(gateway, headers).status_code == 200
    [ask] = asks
    assert ask.band is band
    assert ask.key == (str(keys[credential]["id"]) if credential in keys else None), "caps count per key"
    ada = gateway.services.users.find_by_email("ada@example.com")
    assert ask.user == str(ada.id)


@pytest.fixture
def one_slot() -> Iterator[FakeOllama]:
    host = FakeOllama(num_parallel=1).start()
    yield host
    host.stop()


def test_a_batch_keys_requests_wait_behind_a_persons_chat_even_when_sent_first(make_gateway, one_slot):
    gateway = make_gateway(ollama_url=one_slot.url, ollama_parallel=1)
    script = bearer(new_key(gateway, gateway.admin_headers(), priority="batch")["key"])
    person = bearer(add_user(gateway, "bob@example.com"))
    scheduler = gateway.services.fleet.scheduler
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = pool.submit(chat, gateway, person, "first", tokens=10, interval=0.05)
        _until(lambda: scheduler.inflight_by_slot() != {})
        batch = []
        for number in (1, 2):
            batch.append(
                pool.submit(chat, gateway, {**script, "X-Priority": "interactive"}, f"batch {number}")
            )
            _until(_waiting(scheduler, "batch", number))
        chat_later = pool.submit(chat, gateway, person, "chat")
        _until(_waiting(scheduler, "interactive", 1))
        answers = [future.result() for future in (busy, *batch, chat_later)]
    assert [answer.status_code for answer in answers] == [200] * 4
    order = [_last_text(request.body) for request in one_slot.requests if request.path == "/api/chat"]
    assert order == ["first", "chat", "batch 1", "batch 2"]


def _last_text(body: bytes) -> str:
    return json.loads(body)["messages"][-1]["content"]


def _waiting(scheduler: Scheduler, band: str, count: int) -> Callable[[], bool]:
    return lambda: scheduler.waiting()[band] == count


def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.01)


# Per-person caps


def patch_user(gateway: RunningGateway, user_id: int, change: dict) -> httpx.Response:
    return httpx.patch(f"{gateway.url}/admin/users/{user_id}", json=change, headers=gateway.admin_headers())


def test_an_admin_sets_a_persons_caps_and_null_gives_back_the_settings(gateway):
    token = add_user(gateway, "caps@example.com")
    person = gateway.services.users.find_by_email("caps@example.com")
    assert (person.max_inflight, person.max_waiting) == (None, None)
    changed = patch_user(gateway, person.id, {"max_inflight": 2, "max_waiting": 0})
    assert changed.status_code == 200
    assert (changed.json()["max_inflight"], changed.json()["max_waiting"]) == (2, 0)
    me = httpx.get(f"{gateway.url}/me", headers=bearer(token)).json()
    assert (me["max_inflight"], me["max_waiting"]) == (2, 0), "they see their own caps"
    reset = patch_user(gateway, person.id, {"max_inflight": None})
    assert (reset.json()["max_inflight"], reset.json()["max_waiting"]) == (None, 0), "only what was sent"


@pytest.mark.parametrize("change", [{"max_inflight": -1}, {"max_waiting": 10**7}, {"max_waiting": "many"}])
def test_a_cap_out_of_range_is_422(gateway, change):
    response = patch_user(gateway, 1, change)
    assert response.status_code == 422
    [field] = change
    assert field in response.json()["error"]


def test_a_persons_own_waiting_cap_applies_from_their_next_request(make_gateway, one_slot):
    gateway = make_gateway(ollama_url=one_slot.url, ollama_parallel=1, max_waiting_per_user=1)
    bob = bearer(add_user(gateway, "bob@example.com"))
    assert chat(gateway, bob).status_code == 200  # his credentials are in the cache now
    bob_id = gateway.services.users.find_by_email("bob@example.com").id
    assert patch_user(gateway, bob_id, {"max_waiting": 2}).status_code == 200
    scheduler = gateway.services.fleet.scheduler
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = pool.submit(chat, gateway, gateway.admin_headers(), "first", tokens=10, interval=0.05)
        _until(lambda: scheduler.inflight_by_slot() != {})
        waiting = []
        for number in (1, 2):
            waiting.append(pool.submit(chat, gateway, bob))
            _until(_waiting(scheduler, "interactive", number))
        refused = chat(gateway, bob)
        answers = [future.result() for future in (busy, *waiting)]
    assert [answer.status_code for answer in answers] == [200] * 3
    assert refused.status_code == 429
    assert refused.json() == {"error": "you already have 2 requests waiting"}
    assert int(refused.headers["retry-after"]) >= 1


def test_a_persons_own_inflight_cap_holds_their_requests_back_while_slots_are_free(make_gateway):
    host = FakeOllama(num_parallel=2).start()
    try:
        gateway = make_gateway(ollama_url=host.url, ollama_parallel=2)
        bob = bearer(add_user(gateway, "bob@example.com"))
        bob_id = gateway.services.users.find_by_email("bob@example.com").id
        assert patch_user(gateway, bob_id, {"max_inflight": 1}).status_code == 200
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: chat(gateway, bob, tokens=5, interval=0.03), range(3)))
        assert [answer.status_code for answer in answers] == [200] * 3
        assert host.model_stats(MODEL).max_in_flight == 1
    finally:
        host.stop()

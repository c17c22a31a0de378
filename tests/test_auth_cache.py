"""Authentication answered from the cache (auth.cache): no database round trip per request, and every change
that ends or narrows what credentials may do is seen at once, from this process or another."""

from collections.abc import Callable

import httpx
import pytest

from tests.databases import execute, on_postgres
from tests.servers import RunningGateway, add_user

pytestmark = pytest.mark.storage
REQUESTS = 20


def _counted(gateway: RunningGateway, store: str, method: str) -> list[int]:
    """Count the calls of one store method (the authenticator reads the database only through them)."""
    target = getattr(gateway.services, store)
    original: Callable = getattr(target, method)
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(target, method, counting)
    return calls


def test_a_token_used_again_and_again_is_read_from_the_database_once(make_gateway, ollama):
    gateway = make_gateway()
    token = add_user(gateway, "ada@example.com")
    reads = _counted(gateway, "users", "get_by_identity")
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}) as ada:
        assert all(ada.get("/me").status_code == 200 for _ in range(REQUESTS))
    assert len(reads) == 1


def test_a_key_used_again_and_again_is_read_from_the_database_at_most_twice(make_gateway, ollama):
    gateway = make_gateway()
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as admin:
        key = admin.post("/keys", json={"name": "k"}).json()["key"]
    reads = _counted(gateway, "keys", "find_with_owner")
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}) as script:
        assert all(script.get("/me").status_code == 200 for _ in range(REQUESTS))
    # Its first use is recorded (last_used_at), a write: on SQLite that empties the cache once.
    assert len(reads) <= 2


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"disabled": True}, id="disabled"),
        pytest.param({"password": "a-brand-new-password-1"}, id="password-changed"),
    ],
)
def test_a_change_by_an_admin_ends_a_cached_token_at_once(make_gateway, ollama, change):
    gateway = make_gateway()
    token = add_user(gateway, "bob@example.com")
    bob = gateway.services.users.find_by_email("bob@example.com")
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{gateway.url}/me", headers=headers).status_code == 200  # now in the cache
    patched = httpx.patch(f"{gateway.url}/admin/users/{bob.id}", json=change, headers=gateway.admin_headers())
    assert patched.status_code == 200
    assert httpx.get(f"{gateway.url}/me", headers=headers).status_code == 401


def test_a_removal_ends_a_cached_key_at_once(make_gateway, ollama):
    gateway = make_gateway()
    token = add_user(gateway, "cy@example.com")
    cy = gateway.services.users.find_by_email("cy@example.com")
    key = httpx.post(f"{gateway.url}/keys", json={"name": "k"}, headers={"Authorization": f"Bearer {token}"})
    headers = {"Authorization": f"Bearer {key.json()['key']}"}
    assert httpx.get(f"{gateway.url}/me", headers=headers).status_code == 200
    removed = httpx.delete(f"{gateway.url}/admin/users/{cy.id}", headers=gateway.admin_headers())
    assert removed.status_code == 204
    assert httpx.get(f"{gateway.url}/me", headers=headers).status_code == 401


def test_a_lost_admin_role_is_seen_at_once(make_gateway, ollama):
    gateway = make_gateway()
    token = add_user(gateway, "dee@example.com", role="admin")
    dee = gateway.services.users.find_by_email("dee@example.com")
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{gateway.url}/admin/users", headers=headers).status_code == 200
    gateway.services.users.update(dee.id, role="user")  # straight on the store, as manage.py would
    assert httpx.get(f"{gateway.url}/admin/users", headers=headers).status_code == 403


def test_a_change_made_by_another_process_is_seen_at_once(make_gateway, ollama):
    """Another process: another worker, a replica or manage.py, here a connection of the test's own. It says
    so as the stores do: NOTIFY on Postgres, the credential counter on SQLite."""
    gateway = make_gateway()
    token = add_user(gateway, "eve@example.com")
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{gateway.url}/me", headers=headers).status_code == 200
    execute(
        gateway.settings, "UPDATE users SET disabled = :yes WHERE email = 'eve@example.com'", {"yes": True}
    )
    if on_postgres():
        execute(gateway.settings, "NOTIFY gateway_credentials")
    else:
        execute(gateway.settings, "UPDATE credential_changes SET version = version + 1")
    assert httpx.get(f"{gateway.url}/me", headers=headers).status_code == 401


def test_usage_records_written_do_not_empty_the_cache(make_gateway, ollama):
    """Usage records are committed twice a second under load: the cache keeps what it knows through them."""
    gateway = make_gateway()
    headers = gateway.admin_headers()
    embed = {"model": "llama3.2:1b", "input": "x"}
    assert httpx.post(f"{gateway.url}/api/embed", json=embed, headers=headers).status_code == 200
    cache = gateway.services.authenticator._cache
    gateway.run(gateway.services.usage.writer.flush())
    assert httpx.get(f"{gateway.url}/me", headers=headers).status_code == 200
    generation = cache.generation
    httpx.post(f"{gateway.url}/api/embed", json=embed, headers=headers)
    gateway.run(gateway.services.usage.writer.flush())  # a commit of another connection
    assert httpx.get(f"{gateway.url}/me", headers=headers).status_code == 200
    assert cache.generation == generation

"""The audit trail of admin actions (`GET /admin/audit`, `manage.py audit`): one entry per action that
succeeded, with who, what, to what and from where; none for one that failed; never a secret."""

import time

import httpx
import pytest

from tests.databases import execute
from tests.test_manage import manage

pytestmark = pytest.mark.storage

BOB = {"email": "bob@example.com", "password": "bobs-long-password"}
LOOPBACK = "127.0.0.1"


@pytest.fixture
def gateway(make_gateway, tmp_path, ollama):
    return make_gateway(data_dir=tmp_path / "data")


@pytest.fixture
def admin(gateway):
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30) as http:
        yield http


@pytest.fixture
def bob_id(admin) -> int:
    created = admin.post("/admin/users", json=BOB)
    assert created.status_code == 201
    return created.json()["id"]


@pytest.fixture
def bob(gateway, bob_id):
    token = gateway.login(BOB["email"], BOB["password"])
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        yield http


def entries(admin: httpx.Client, **params) -> list[dict]:
    response = admin.get("/admin/audit", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return response.json()["entries"]


def only(admin: httpx.Client, action: str) -> dict:
    (entry,) = entries(admin, action=action)
    return entry


def admin_id(gateway) -> int:
    return gateway.services.users.find_by_email(gateway.admin_email).id


def whole_table(gateway) -> str:
    return str(execute(gateway.settings, "SELECT * FROM audit_entries"))


# Each kind of action: one entry, with its actor, target and address


def test_create_user_leaves_one_entry_naming_the_admin_and_their_address(gateway, admin, bob_id):
    entry = only(admin, "user.create")
    assert entry["actor_id"] == admin_id(gateway)
    assert entry["actor"] == gateway.admin_email
    assert (entry["target"], entry["address"]) == (f"user {bob_id}", LOOPBACK)
    assert entry["details"] == {"email": BOB["email"], "password": "set", "role": "user", "models": None}


def test_update_user_records_exactly_the_fields_the_body_sent(admin, bob_id):
    # max_inflight has no audit code of its own: whatever UserPatch has is recorded as sent (quota, later).
    changed = admin.patch(f"/admin/users/{bob_id}", json={"max_inflight": 2, "models": ["llama3.2:1b"]})
    assert changed.status_code == 200
    entry = only(admin, "user.update")
    assert entry["target"] == f"user {bob_id}"
    assert entry["details"] == {"max_inflight": 2, "models": ["llama3.2:1b"]}


def test_update_user_says_a_password_changed_and_never_what_it_is(gateway, admin, bob_id):
    new_password = "bobs-brand-new-password"
    assert admin.patch(f"/admin/users/{bob_id}", json={"password": new_password}).status_code == 200
    assert only(admin, "user.update")["details"] == {"password": "changed"}
    table = whole_table(gateway)
    assert new_password not in table
    assert BOB["password"] not in table
    assert "$argon2" not in table and "$2b$" not in table  # no hash either


def test_delete_user_records_who_it_was(admin, bob_id):
    assert admin.delete(f"/admin/users/{bob_id}").status_code == 204
    entry = only(admin, "user.delete")
    assert (entry["target"], entry["details"]) == (f"user {bob_id}", {"email": BOB["email"]})


def test_a_users_own_key_is_recorded_as_theirs_and_never_its_secret(gateway, admin, bob, bob_id):
    created = bob.post("/keys", json={"name": "nightly", "priority": "batch"})
    assert created.status_code == 201
    entry = only(admin, "key.create")
    assert (entry["actor_id"], entry["actor"]) == (bob_id, BOB["email"])
    assert entry["target"] == f"key {created.json()['id']}"
    assert entry["details"] == {
        "name": "nightly",
        "expires_in_days": None,
        "priority": "batch",
        "user_id": bob_id,
    }
    secret = created.json()["key"]
    assert secret not in whole_table(gateway)
    assert secret.rsplit("_", 1)[1] not in whole_table(gateway)


def test_a_users_own_key_revoked_is_recorded_as_theirs(admin, bob, bob_id):
    key_id = bob.post("/keys", json={"name": "nightly"}).json()["id"]
    assert bob.delete(f"/keys/{key_id}").status_code == 204
    entry = only(admin, "key.revoke")
    assert (entry["actor_id"], entry["target"]) == (bob_id, f"key {key_id}")


def test_an_admin_revoking_anyones_key_is_recorded_as_the_admins(gateway, admin, bob):
    key_id = bob.post("/keys", json={"name": "nightly"}).json()["id"]
    assert admin.delete(f"/admin/keys/{key_id}").status_code == 204
    entry = only(admin, "key.revoke")
    assert (entry["actor_id"], entry["target"]) == (admin_id(gateway), f"key {key_id}")


def test_host_add_change_and_remove_are_recorded_without_the_hosts_credentials(gateway, admin):
    added = admin.post("/admin/hosts", json={"name": "gpu-2", "url": "http://ops:hunter22@gpu-2.lan:11434"})
    assert added.status_code == 201
    assert admin.patch("/admin/hosts/h1", json={"draining": True}).status_code == 200
    assert admin.delete("/admin/hosts/h1").status_code == 204
    add, change, remove = (only(admin, action) for action in ("host.add", "host.change", "host.remove"))
    assert {add["target"], change["target"], remove["target"]} == {"host gpu-2"}
    assert add["details"] == {
        "id": "h1",
        "name": "gpu-2",
        "url": "http://gpu-2.lan:11434",
        "slots": None,
        "enabled": True,
    }
    assert change["details"] == {"id": "h1", "draining": True}
    assert "hunter22" not in whole_table(gateway)


def test_a_model_pulled_through_the_admin_relay_is_one_entry_naming_model_and_host(admin):
    pulled = admin.post("/api/pull", json={"model": "llama3.2:1b", "stream": False})
    assert pulled.status_code == 200
    # Written without holding up the answer (a pull's progress may stream for minutes): wait a little.
    deadline = time.monotonic() + 5
    while not (found := entries(admin, action="model.")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (entry,) = found
    assert entry["action"] == "model.pull"
    assert (entry["target"], entry["address"]) == ("llama3.2:1b", LOOPBACK)
    assert entry["details"] == {"host": None}


def test_a_model_action_ollama_refused_leaves_no_entry(admin, ollama):
    refused = admin.request("DELETE", "/api/delete", json={"model": "no-such-model:1b"})
    assert refused.status_code == 404
    time.sleep(0.3)  # what an accepted request would have taken to be written
    assert entries(admin, action="model.") == []


# An action that failed leaves nothing


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        pytest.param("PATCH", "/admin/users/999", {"role": "admin"}, 404, id="patch-no-such-user"),
        pytest.param("PATCH", "/admin/users/{bob}", {"role": "root"}, 422, id="patch-bad-body"),
        pytest.param("DELETE", "/admin/users/999", None, 404, id="delete-no-such-user"),
        pytest.param("POST", "/admin/users", {"email": BOB["email"], "password": "x" * 12}, 409, id="taken"),
        pytest.param("DELETE", "/admin/keys/999", None, 404, id="revoke-no-such-key"),
        pytest.param("PATCH", "/admin/hosts/h9", {"draining": True}, 404, id="change-no-such-host"),
        pytest.param("DELETE", "/admin/hosts/env-1", None, 409, id="remove-environment-host"),
    ],
)
def test_an_action_that_failed_leaves_no_entry(admin, bob_id, method, path, body, status):
    before = entries(admin)
    response = admin.request(method, path.format(bob=bob_id), json=body)
    assert response.status_code == status
    assert entries(admin) == before


# Reading: filters, paging, who may


@pytest.fixture
def history(admin, bob_id) -> int:
    """user.create (bob), then three user.update, then a key.create: five entries."""
    for caps in (1, 2, 3):
        assert admin.patch(f"/admin/users/{bob_id}", json={"max_waiting": caps}).is_success
    assert admin.post("/keys", json={"name": "k"}).is_success
    return bob_id


def test_read_is_newest_first(admin, history):
    actions = [entry["action"] for entry in entries(admin)]
    assert actions == ["key.create", "user.update", "user.update", "user.update", "user.create"]


def test_read_action_filter_is_exact_or_a_prefix_ending_in_a_dot(admin, history):
    assert len(entries(admin, action="user.update")) == 3
    assert len(entries(admin, action="user.")) == 4
    assert entries(admin, action="user") == []


def test_read_actor_id_filter(gateway, admin, bob, history):
    bob.post("/keys", json={"name": "bobs"})
    assert [entry["actor_id"] for entry in entries(admin, actor_id=history)] == [history]
    assert len(entries(admin, actor_id=admin_id(gateway))) == 5


def test_read_time_range_by_date_and_by_date_time(admin, history):
    (newest, *_) = entries(admin)
    day = newest["at"][:10]
    assert len(entries(admin, since=day, until=day)) == 5, "a date as until takes in its whole day"
    assert entries(admin, until="2000-01-01") == []
    assert entries(admin, since="2999-01-01T00:00:00+02:00") == []
    assert len(entries(admin, since=newest["at"])) >= 1


def test_read_pages_with_before_and_next(admin, history):
    seen: list[int] = []
    params: dict = {"limit": 2}
    while True:
        page = admin.get("/admin/audit", params=params).json()
        seen += [entry["id"] for entry in page["entries"]]
        if page["next"] is None:
            break
        params["before"] = page["next"]
    assert seen == [entry["id"] for entry in entries(admin)]
    assert len(seen) == 5


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"since": "yesterday"}, id="since-not-a-date"),
        pytest.param({"until": "2026-02-30"}, id="until-no-such-day"),
        pytest.param({"limit": 0}, id="limit-0"),
        pytest.param({"limit": 1001}, id="limit-over-1000"),
        pytest.param({"before": "x"}, id="before-not-a-number"),
        pytest.param({"actor_id": 2**63}, id="actor-id-too-large"),
        pytest.param({"action": "user'; --"}, id="action-not-a-name"),
        pytest.param({"action": "user.\x00"}, id="action-nul"),
    ],
)
def test_read_bad_query_is_422_in_the_error_shape(admin, params):
    response = admin.get("/admin/audit", params=params)
    assert response.status_code == 422
    assert set(response.json()) == {"error"}


def test_read_by_a_user_is_403_and_by_nobody_401(gateway, bob):
    assert bob.get("/admin/audit").status_code == 403
    anonymous = httpx.get(f"{gateway.url}/admin/audit")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"


# manage.py


def test_manage_py_actions_are_recorded_as_manage_py_without_an_address(gateway, admin):
    assert manage(gateway, "create-user", "eve@example.com").returncode == 0
    assert manage(gateway, "reset-password", "eve@example.com").returncode == 0
    create, update = only(admin, "user.create"), only(admin, "user.update")
    for entry in (create, update):
        assert (entry["actor_id"], entry["actor"], entry["address"]) == (None, "manage.py", None)
    assert update["details"] == {"password": "changed", "disabled": False}


def test_manage_py_host_and_key_commands_are_recorded(gateway, admin):
    assert manage(gateway, "add-host", "gpu-2", "http://ops:hunter22@gpu-2.lan:11434").returncode == 0
    assert manage(gateway, "drain-host", "h1").returncode == 0
    assert manage(gateway, "remove-host", "h1").returncode == 0
    created = manage(gateway, "create-key", gateway.admin_email, "nightly")
    assert created.returncode == 0
    assert manage(gateway, "revoke-key", "1").returncode == 0
    actions = [entry["action"] for entry in entries(admin)]
    assert actions == ["key.revoke", "key.create", "host.remove", "host.change", "host.add"]
    assert only(admin, "host.change")["details"] == {"id": "h1", "draining": True}
    table = whole_table(gateway)
    assert "hunter22" not in table
    assert created.stdout.split("key: ")[1].split()[0] not in table


def test_manage_py_audit_prints_the_latest_entries_newest_last(gateway, admin, bob_id):
    admin.patch(f"/admin/users/{bob_id}", json={"disabled": True})
    printed = manage(gateway, "audit", "--limit", "1")
    assert printed.returncode == 0, printed.stderr
    (line,) = printed.stdout.splitlines()
    assert line.split("\t")[2:6] == [gateway.admin_email, LOOPBACK, "user.update", f"user {bob_id}"]

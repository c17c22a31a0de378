"""A shared team server: people, roles, API keys, per-user model access, throttling, persistence."""

import hashlib
import sqlite3
import time
from dataclasses import dataclass

import httpx
import pytest

from db.legacy import MIGRATIONS
from tests import tokens
from tests.databases import execute
from tests.servers import RunningGateway, gateway_settings, start_gateway
from tests.surfaces import MODEL_LISTS, error_message, model_calls

pytestmark = pytest.mark.storage

ALLOWED = "llama3.2:1b"
NOT_ALLOWED = "llava:7b"
BOB_PASSWORD = "bobs-long-password"


@dataclass
class Team:
    gateway: RunningGateway
    bob_id: int

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.gateway.url, headers=headers, timeout=30)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.gateway.url, headers=self.gateway.admin_headers(), timeout=30)

    def bob_token(self) -> str:
        response = httpx.post(
            f"{self.gateway.url}/login", json={"email": "bob@example.com", "password": BOB_PASSWORD}
        )
        response.raise_for_status()
        return response.json()["access_token"]


@pytest.fixture
def team(make_gateway, ollama) -> Team:
    gateway = make_gateway()
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as admin:
        created = admin.post(
            "/admin/users",
            json={"email": "bob@example.com", "password": BOB_PASSWORD, "role": "user", "models": [ALLOWED]},
        )
    assert created.status_code == 201
    return Team(gateway, created.json()["id"])


# The admin API


def test_admin_manages_a_users_whole_life(team):
    with team.admin() as admin:
        created = admin.post("/admin/users", json={"email": "cy@example.com", "password": "cys-password-1"})
        assert created.status_code == 201
        user = created.json()
        assert user | {"id": 0, "created_at": ""} == {
            "id": 0,
            "email": "cy@example.com",
            "role": "user",
            "models": None,
            "disabled": False,
            "created_at": "",
            "max_inflight": None,
            "max_waiting": None,
            "quota": None,
        }
        assert "cy@example.com" in {listed["email"] for listed in admin.get("/admin/users").json()}
        assert admin.get(f"/admin/users/{user['id']}").json()["email"] == "cy@example.com"

        patched = admin.patch(f"/admin/users/{user['id']}", json={"role": "admin", "models": ["a:1", "b:2"]})
        assert patched.json()["role"] == "admin"
        assert patched.json()["models"] == ["a:1", "b:2"]
        cleared = admin.patch(f"/admin/users/{user['id']}", json={"models": None})
        assert cleared.json()["models"] is None
        assert cleared.json()["role"] == "admin", "fields not sent stay as they were"

        assert admin.delete(f"/admin/users/{user['id']}").status_code == 204
        assert admin.get(f"/admin/users/{user['id']}").status_code == 404
        assert admin.delete(f"/admin/users/{user['id']}").status_code == 404


ADMIN_ROUTES = [
    ("POST", "/admin/users", {"email": "x@example.com", "password": "long-password-1"}),
    ("GET", "/admin/users", None),
    ("GET", "/admin/users/1", None),
    ("PATCH", "/admin/users/1", {"role": "user"}),
    ("DELETE", "/admin/users/1", None),
    ("GET", "/admin/keys", None),
    ("DELETE", "/admin/keys/1", None),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), ADMIN_ROUTES, ids=[f"{m} {p}" for m, p, _ in ADMIN_ROUTES]
)
def test_a_user_calling_an_admin_route_is_403(team, method, path, body):
    with team.http(team.bob_token()) as bob:
        response = bob.request(method, path, json=body)
    assert response.status_code == 403
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"email": "not-an-email", "password": "long-password-1"}, id="bad-email"),
        pytest.param({"email": "d@example.com", "password": "short"}, id="short-password"),
        pytest.param({"email": "d@example.com", "password": "changeme"}, id="well-known-password"),
        pytest.param(
            {"email": "d@example.com", "password": "long-password-1", "role": "root"}, id="unknown-role"
        ),
        pytest.param(
            {"email": "d@example.com", "password": "long-password-1", "models": [""]}, id="empty-model"
        ),
        pytest.param({"email": "d@example.com"}, id="no-password"),
    ],
)
def test_an_invalid_new_user_is_422(team, body):
    with team.admin() as admin:
        response = admin.post("/admin/users", json=body)
    assert response.status_code == 422
    assert isinstance(response.json()["error"], str)


def test_a_taken_email_is_409(team):
    with team.admin() as admin:
        response = admin.post(
            "/admin/users", json={"email": "BOB@example.com", "password": "long-password-1"}
        )
    assert response.status_code == 409


@pytest.mark.parametrize(
    ("method", "change"),
    [("PATCH", {"disabled": True}), ("PATCH", {"role": "user"}), ("DELETE", None)],
    ids=["disable", "demote", "delete"],
)
def test_the_last_enabled_admin_cannot_be_removed(team, method, change):
    with team.admin() as admin:
        admin_id = next(user["id"] for user in admin.get("/admin/users").json() if user["role"] == "admin")
        response = admin.request(method, f"/admin/users/{admin_id}", json=change)
        assert response.status_code == 409
        assert admin.get("/me").status_code == 200, "the admin is still there and enabled"


# Self-service


def test_me_shows_email_role_and_models(team):
    with team.http(team.bob_token()) as bob:
        me = bob.get("/me").json()
    assert (me["email"], me["role"], me["models"]) == ("bob@example.com", "user", [ALLOWED])


def test_a_password_change_ends_every_earlier_token(team):
    old_token = team.bob_token()
    with team.http(old_token) as bob:
        wrong = bob.post(
            "/me/password", json={"current_password": "nope-nope", "new_password": "a-new-password-2"}
        )
        assert wrong.status_code == 403
        changed = bob.post(
            "/me/password", json={"current_password": BOB_PASSWORD, "new_password": "a-new-password-2"}
        )
        assert changed.status_code == 200
        assert bob.get("/me").status_code == 401
    with team.http(changed.json()["access_token"]) as bob_again:
        assert bob_again.get("/me").status_code == 200
    login = httpx.post(
        f"{team.gateway.url}/login", json={"email": "bob@example.com", "password": BOB_PASSWORD}
    )
    assert login.status_code == 401


@pytest.mark.parametrize("password", ["password123", "12345678"])
@pytest.mark.parametrize(
    ("who", "method", "path", "field"),
    [
        pytest.param("admin", "POST", "/admin/users", "password", id="create"),
        pytest.param("admin", "PATCH", "/admin/users/{bob}", "password", id="patch"),
        pytest.param("bob", "POST", "/me/password", "new_password", id="change"),
    ],
)
def test_a_common_password_is_refused_on_every_route(team, who, method, path, field, password):
    body = {field: password}
    if path == "/admin/users":
        body["email"] = "common@example.com"
    if path == "/me/password":
        body["current_password"] = BOB_PASSWORD
    client = team.admin() if who == "admin" else team.http(team.bob_token())
    with client as http:
        response = http.request(method, path.format(bob=team.bob_id), json=body)
    assert response.status_code == 422, response.text
    assert "too common" in response.json()["error"]


TOO_LONG = "x" * 5000  # over passlib's 4096: a 500 (PasswordSizeError) before the maximum
WIDE = "é" * 1025  # over the 1024-character maximum, in 2050 bytes


@pytest.mark.parametrize(
    ("who", "method", "path", "body"),
    [
        pytest.param(
            "admin", "POST", "/admin/users", {"email": "t@example.com", "password": TOO_LONG}, id="create"
        ),
        pytest.param(
            "admin", "POST", "/admin/users", {"email": "t@example.com", "password": WIDE}, id="create-wide"
        ),
        pytest.param("admin", "PATCH", "/admin/users/{bob}", {"password": TOO_LONG}, id="patch"),
        pytest.param(
            "bob",
            "POST",
            "/me/password",
            {"current_password": BOB_PASSWORD, "new_password": TOO_LONG},
            id="new",
        ),
        pytest.param(
            "bob",
            "POST",
            "/me/password",
            {"current_password": TOO_LONG, "new_password": "fine-password-1"},
            id="current",
        ),
        pytest.param(None, "POST", "/login", {"email": "bob@example.com", "password": TOO_LONG}, id="login"),
    ],
)
def test_a_too_long_password_is_refused_never_a_500(team, who, method, path, body):
    token = {"admin": None, "bob": team.bob_token(), None: None}[who]
    client = team.admin() if who == "admin" else team.http(token)
    with client as http:
        response = http.request(method, path.format(bob=team.bob_id), json=body)
    assert 400 <= response.status_code < 500, response.text
    assert isinstance(response.json()["error"], str)
    assert _login(team.gateway, "bob@example.com", BOB_PASSWORD).status_code == 200, "nothing changed"


# API keys


def test_a_key_is_shown_once_stored_as_a_hash_and_works_as_bearer_and_basic(team):
    with team.http(team.bob_token()) as bob:
        created = bob.post("/keys", json={"name": "nightly job"})
        assert created.status_code == 201
        key = created.json()["key"]
        assert key.startswith("ogw_")
        assert created.json()["prefix"] == key[:12]
        listed = bob.get("/keys").json()
        assert [entry["name"] for entry in listed] == ["nightly job"]
        assert "key" not in listed[0]
    assert (
        httpx.get(f"{team.gateway.url}/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    )
    assert httpx.get(f"{team.gateway.url}/api/tags", auth=("script", key)).status_code == 200
    database_files = team.gateway.settings.data_dir.glob("gateway.sqlite3*")  # with its write-ahead log
    assert all(key.encode() not in path.read_bytes() for path in database_files)
    [(stored,)] = execute(team.gateway.settings, "SELECT key_hash FROM api_keys")
    assert stored == hashlib.sha256(key.encode()).hexdigest()


def test_a_key_records_when_it_was_last_used(team):
    with team.http(team.bob_token()) as bob:
        key = bob.post("/keys", json={"name": "k"}).json()["key"]
        assert bob.get("/keys").json()[0]["last_used_at"] is None
        httpx.get(f"{team.gateway.url}/me", headers={"Authorization": f"Bearer {key}"})
        deadline = time.monotonic() + 5  # written off the event loop, a moment later
        while bob.get("/keys").json()[0]["last_used_at"] is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bob.get("/keys").json()[0]["last_used_at"] is not None


def test_a_revoked_key_is_401(team):
    with team.http(team.bob_token()) as bob:
        created = bob.post("/keys", json={"name": "k"}).json()
        assert bob.delete(f"/keys/{created['id']}").status_code == 204
    response = httpx.get(f"{team.gateway.url}/models", headers={"Authorization": f"Bearer {created['key']}"})
    assert response.status_code == 401


def test_an_expired_key_is_401(team):
    with team.http(team.bob_token()) as bob:
        created = bob.post("/keys", json={"name": "k", "expires_in_days": 1}).json()
    assert created["expires_at"] is not None
    execute(
        team.gateway.settings,
        "UPDATE api_keys SET expires_at = '2020-01-01T00:00:00Z' WHERE id = :id",
        {"id": created["id"]},
    )
    response = httpx.get(f"{team.gateway.url}/models", headers={"Authorization": f"Bearer {created['key']}"})
    assert response.status_code == 401


def test_a_user_cannot_revoke_someone_elses_key_but_an_admin_can(team):
    with team.admin() as admin, team.http(team.bob_token()) as bob:
        admins_key = admin.post("/keys", json={"name": "admin's"}).json()
        assert bob.delete(f"/keys/{admins_key['id']}").status_code == 404
        bobs_key = bob.post("/keys", json={"name": "bob's"}).json()
        every_key = admin.get("/admin/keys").json()
        assert {(entry["email"], entry["name"]) for entry in every_key} >= {
            ("bob@example.com", "bob's"),
            (team.gateway.admin_email, "admin's"),
        }
        assert all("key" not in entry for entry in every_key)
        assert admin.delete(f"/admin/keys/{bobs_key['id']}").status_code == 204
    assert (
        httpx.get(
            f"{team.gateway.url}/me", headers={"Authorization": f"Bearer {bobs_key['key']}"}
        ).status_code
        == 401
    )


# Disabled and deleted users


def test_a_disabled_users_unexpired_token_and_keys_stop_working_at_once(team):
    token = team.bob_token()
    with team.http(token) as bob:
        key = bob.post("/keys", json={"name": "k"}).json()["key"]
    with team.admin() as admin:
        admin.patch(f"/admin/users/{team.bob_id}", json={"disabled": True})
        for credential in (token, key):
            assert (
                httpx.get(
                    f"{team.gateway.url}/models", headers={"Authorization": f"Bearer {credential}"}
                ).status_code
                == 401
            )
        login = httpx.post(
            f"{team.gateway.url}/login", json={"email": "bob@example.com", "password": BOB_PASSWORD}
        )
        assert login.status_code == 401
        assert "disabled" in login.json()["error"]
        admin.patch(f"/admin/users/{team.bob_id}", json={"disabled": False})
    assert (
        httpx.get(f"{team.gateway.url}/models", headers={"Authorization": f"Bearer {token}"}).status_code
        == 200
    )


def test_a_deleted_users_credentials_and_uploads_are_gone(team):
    token = team.bob_token()
    with team.http(token) as bob:
        key = bob.post("/keys", json={"name": "k"}).json()["key"]
        stored = bob.post("/upload", files={"file": ("mine.txt", b"bob's")}).json()["filename"]
    assert (team.gateway.settings.uploads_dir / stored).exists()
    with team.admin() as admin:
        assert admin.delete(f"/admin/users/{team.bob_id}").status_code == 204
    for credential in (token, key):
        assert (
            httpx.get(f"{team.gateway.url}/me", headers={"Authorization": f"Bearer {credential}"}).status_code
            == 401
        )
    assert not (team.gateway.settings.uploads_dir / stored).exists()


def test_a_removed_persons_token_and_key_never_work_again_whatever_is_created_after(team):
    """Issue 9, item 2: SQLite handed a removed person's row id to the next account, an admin here, and
    their unexpired token signed in as that admin."""
    token = team.bob_token()
    with team.http(token) as bob:
        key = bob.post("/keys", json={"name": "k"}).json()["key"]
    with team.admin() as admin:
        assert admin.delete(f"/admin/users/{team.bob_id}").status_code == 204
        for number in range(3):
            created = admin.post(
                "/admin/users",
                json={"email": f"new{number}@example.com", "password": "new-admin-pass", "role": "admin"},
            )
            assert created.status_code == 201
            assert created.json()["id"] != team.bob_id
    for credential in (token, key):
        with team.http(credential) as old:
            assert old.get("/me").status_code == 401
            assert old.post("/keys", json={"name": "forever"}).status_code == 401
            assert old.get("/admin/users").status_code == 401


def test_a_revoked_keys_id_is_never_given_to_another_key(team):
    with team.http(team.bob_token()) as bob:
        first = bob.post("/keys", json={"name": "first"}).json()
        assert bob.delete(f"/keys/{first['id']}").status_code == 204
        second = bob.post("/keys", json={"name": "second"}).json()
        assert second["id"] != first["id"]
        assert bob.delete(f"/keys/{first['id']}").status_code == 404, "a stale id revokes nothing"
        assert bob.get("/keys").json()[0]["name"] == "second"


# Model access


SURFACES = model_calls(NOT_ALLOWED)


@pytest.mark.parametrize(("path", "body"), SURFACES, ids=[path for path, _ in SURFACES])
def test_a_model_outside_the_users_list_is_403_on_every_surface(team, ollama, path, body):
    with team.http(team.bob_token()) as bob:
        refused = bob.post(path, json=body)
        allowed = bob.post(path, json=body | {"model": ALLOWED, "stream": False})
    assert refused.status_code == 403
    assert NOT_ALLOWED in error_message(refused)
    assert allowed.status_code == 200
    assert all(NOT_ALLOWED not in request.body.decode() for request in ollama.requests)


def test_a_model_by_its_path_on_v1_models_is_checked_too(team, ollama):
    with team.http(team.bob_token()) as bob:
        assert bob.get(f"/v1/models/{NOT_ALLOWED}").status_code == 403
        assert bob.get(f"/v1/models/{ALLOWED}").status_code == 200


@pytest.mark.parametrize(("path", "field", "key"), MODEL_LISTS)
def test_model_lists_show_a_user_only_their_models_and_an_admin_all(team, ollama, path, field, key):
    with team.http(team.bob_token()) as bob, team.admin() as admin:
        for_bob = {entry[key] for entry in bob.get(path).json()[field]}
        for_admin = {entry[key] for entry in admin.get(path).json()[field]}
    assert for_bob == {ALLOWED}
    assert {ALLOWED, NOT_ALLOWED} <= for_admin


def test_an_allow_list_entry_without_a_tag_means_latest(team, ollama):
    with team.admin() as admin:
        admin.patch(f"/admin/users/{team.bob_id}", json={"models": ["llama3.2"]})
    with team.http(team.bob_token()) as bob:
        assert bob.post("/api/show", json={"model": "llama3.2:latest"}).status_code != 403
        assert bob.post("/api/show", json={"model": ALLOWED}).status_code == 403


# Uploads


def test_uploads_are_listed_and_deleted_by_their_owner_only(team):
    with team.admin() as admin, team.http(team.bob_token()) as bob:
        admins = admin.post("/upload", files={"file": ("a.txt", b"admin's")}).json()["filename"]
        bobs = bob.post("/upload", files={"file": ("b.txt", b"bob's")}).json()["filename"]
        assert [upload["filename"] for upload in bob.get("/files").json()] == [bobs]
        assert bob.get(f"/files/{admins}").status_code == 404
        assert bob.delete(f"/files/{admins}").status_code == 404
        assert admin.get(f"/files/{admins}").content == b"admin's"
        assert bob.delete(f"/files/{bobs}").status_code == 204
        assert bob.get(f"/files/{bobs}").status_code == 404
        assert bob.get("/files").json() == []
    assert not (team.gateway.settings.uploads_dir / bobs).exists()


# Sign-in limits (more in tests/test_sign_in_limits.py)


def _login(gateway: RunningGateway, email: str, password: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/login", json={"email": email, "password": password})


def test_failed_logins_past_the_pair_limit_are_429_with_retry_after(team):
    for _ in range(team.gateway.settings.login_max_failures):
        assert _login(team.gateway, "bob@example.com", "wrong-password").status_code == 401
    throttled = _login(team.gateway, "bob@example.com", BOB_PASSWORD)
    assert throttled.status_code == 429
    assert 0 < int(throttled.headers["retry-after"]) <= team.gateway.settings.login_window_minutes * 60
    assert "too many" in throttled.json()["error"]


def test_a_successful_login_resets_the_pairs_count(make_gateway, ollama):
    gateway = make_gateway(login_max_failures=3)
    for _ in range(2):
        assert _login(gateway, gateway.admin_email, "wrong-password").status_code == 401
    assert _login(gateway, gateway.admin_email, gateway.admin_password).status_code == 200
    for _ in range(3):
        assert _login(gateway, gateway.admin_email, "wrong-password").status_code == 401
    assert _login(gateway, gateway.admin_email, gateway.admin_password).status_code == 429


def test_failed_logins_from_one_address_are_throttled_across_emails(make_gateway, ollama):
    gateway = make_gateway(login_max_failures_per_address=3)
    for number in range(3):
        assert _login(gateway, f"guess{number}@example.com", "wrong-password").status_code == 401
    assert _login(gateway, gateway.admin_email, gateway.admin_password).status_code == 429


# Persistence


def test_a_restart_keeps_users_keys_and_uploads(tmp_path, fake_ollama_server):
    settings = gateway_settings(tmp_path / "data", fake_ollama_server.url)
    first, server = start_gateway(settings)
    try:
        with httpx.Client(base_url=first.url, headers=first.admin_headers()) as admin:
            admin.post("/admin/users", json={"email": "dee@example.com", "password": "dees-password-1"})
            key = admin.post("/keys", json={"name": "k"}).json()["key"]
            stored = admin.post("/upload", files={"file": ("keep.txt", b"kept")}).json()["filename"]
    finally:
        server.stop()

    second, server = start_gateway(settings)
    try:
        assert _login(second, "dee@example.com", "dees-password-1").status_code == 200
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {key}"}) as scripted:
            assert scripted.get(f"/files/{stored}").content == b"kept"
    finally:
        server.stop()


@pytest.mark.sqlite_only
def test_an_older_database_is_upgraded_in_place_without_losing_data(tmp_path, fake_ollama_server):
    from auth.passwords import hash_password

    data_dir = tmp_path / "data"
    (data_dir / "uploads").mkdir(parents=True)
    with sqlite3.connect(
        data_dir / "gateway.sqlite3"
    ) as db:  # the first schema, as the first release left it
        db.executescript(MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        db.execute(
            "INSERT INTO users (email, password_hash, role) VALUES (?, ?, 'admin')",
            ("old@example.com", hash_password("old-admin-password")),
        )
    (data_dir / "uploads" / ("a" * 32 + "_old.txt")).write_bytes(b"old file")
    with sqlite3.connect(data_dir / "gateway.sqlite3") as db:
        db.execute(
            "INSERT INTO uploads (filename, owner_id, original_name, size, content_type)"
            " VALUES (?, 1, 'old.txt', 8, 'text/plain')",
            ("a" * 32 + "_old.txt",),
        )

    gateway, server = start_gateway(gateway_settings(data_dir, fake_ollama_server.url))
    try:
        token = gateway.login("old@example.com", "old-admin-password")
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}) as old:
            me = old.get("/me").json()
            assert (me["role"], me["models"], me["disabled"]) == ("admin", None, False)
            assert old.get(f"/files/{'a' * 32}_old.txt").content == b"old file"
            assert old.post("/keys", json={"name": "new feature"}).status_code == 201
    finally:
        server.stop()
    with sqlite3.connect(data_dir / "gateway.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


@pytest.mark.sqlite_only
def test_after_upgrading_a_second_release_database_old_tokens_end_and_keys_keep_working(
    tmp_path, fake_ollama_server
):
    """Ids freed before the upgrade can't be known, so tokens issued before it (which named a row id) stop
    working: everyone signs in again once. API keys are looked up by their hash and keep working."""
    from auth.passwords import hash_password

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    secret_key = "s" * 48
    key = "ogw_abcdefgh_" + "k" * 43
    with sqlite3.connect(data_dir / "gateway.sqlite3") as db:  # the second release's schema
        for script in MIGRATIONS[:2]:
            db.executescript(script)
        db.execute("PRAGMA user_version = 2")
        db.execute(
            "INSERT INTO users (email, password_hash, role) VALUES ('old@example.com', ?, 'admin')",
            (hash_password("old-admin-password"),),
        )
        db.execute(
            "INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES (1, 'job', ?, ?)",
            (key[:12], hashlib.sha256(key.encode()).hexdigest()),
        )
    issued_before = tokens.signed(tokens.claims(1), secret_key)

    gateway, server = start_gateway(gateway_settings(data_dir, fake_ollama_server.url, secret_key=secret_key))
    try:
        assert (
            httpx.get(f"{gateway.url}/me", headers={"Authorization": f"Bearer {issued_before}"}).status_code
            == 401
        )
        token = gateway.login("old@example.com", "old-admin-password")
        me = httpx.get(f"{gateway.url}/me", headers={"Authorization": f"Bearer {token}"})
        assert (me.status_code, me.json()["id"]) == (200, 1)
        assert httpx.get(f"{gateway.url}/me", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        server.stop()

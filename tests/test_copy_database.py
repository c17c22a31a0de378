"""`manage.py copy-database --to postgresql://...`: a gateway moves from SQLite to Postgres with its people,
keys, upload records and sign-in limits' state, and carries on there as before.

It needs a Postgres server: it runs in `make test`'s Postgres pass (`--database=postgresql`)."""

import subprocess
import sys

import httpx
import pytest

from tests.databases import execute, new_database_url, on_postgres
from tests.processes import REPO, clean_environment
from tests.servers import gateway_settings, start_gateway

pytestmark = [pytest.mark.storage, pytest.mark.postgres_only]
DEE = {"email": "dee@example.com", "password": "dees-password-1"}


def _copy(data_dir, target: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "manage.py"), "copy-database", "--to", target],
        cwd=data_dir.parent,
        env=clean_environment(DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_gateway_copied_to_postgres_carries_on_there_as_before(tmp_path, fake_ollama_server):
    assert on_postgres()
    data_dir = tmp_path / "data"
    settings = gateway_settings(data_dir, fake_ollama_server.url, database_url=None, login_max_failures=3)
    first, server = start_gateway(settings)
    try:
        with httpx.Client(base_url=first.url, headers=first.admin_headers()) as admin:
            for email in ("gone@example.com", "dee@example.com"):
                admin.post("/admin/users", json={"email": email, "password": "dees-password-1"})
            gone = next(u for u in admin.get("/admin/users").json() if u["email"] == "gone@example.com")
            assert admin.delete(f"/admin/users/{gone['id']}").status_code == 204
            key = admin.post("/keys", json={"name": "nightly"}).json()["key"]
            stored = admin.post("/upload", files={"file": ("keep.txt", b"kept")}).json()["filename"]
            used = admin.post("/api/embed", json={"model": "llama3.2:1b", "input": "counted"})
            assert used.status_code == 200
            users_before = admin.get("/admin/users").json()
        token = first.login("dee@example.com", "dees-password-1")
        for _ in range(3):  # dee's password guessed wrong: the pair's limit is reached
            httpx.post(f"{first.url}/login", json={"email": "dee@example.com", "password": "wrong-guess"})
    finally:
        server.stop()

    target = new_database_url()
    assert target is not None
    copied = _copy(data_dir, target)
    assert copied.returncode == 0, copied.stderr
    counts = (
        "2 users, 1 api_keys, 1 uploads, 5 login_attempts, 2 known_addresses, 0 hosts, 1 usage_records, "
        "4 audit_entries"
    )
    assert f"copied {counts} to " in copied.stdout

    moved = gateway_settings(data_dir, fake_ollama_server.url, database_url=target, login_max_failures=3)
    second, server = start_gateway(moved)
    try:
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {token}"}) as dee:
            assert dee.get("/me").json()["email"] == "dee@example.com"  # a token issued before the move
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {key}"}) as script:
            assert script.get("/admin/users").json() == users_before
            assert script.get(f"/files/{stored}").content == b"kept"
            assert script.get("/admin/usage").json()["totals"]["requests"] == 1  # what was used came along
            added = script.post(
                "/admin/users", json={"email": "eve@example.com", "password": "eves-password-1"}
            )
            assert added.json()["id"] > gone["id"], "the removed person's id is never given again"
        refused = httpx.post(f"{second.url}/login", json=DEE)
        assert refused.status_code == 429, "the sign-in limits' state came along"
    finally:
        server.stop()
    assert execute(moved, "SELECT count(*) FROM login_attempts WHERE outcome = 'failed'") == [(3,)]


def test_a_copy_into_a_database_that_holds_data_is_refused_in_one_line(tmp_path, fake_ollama_server):
    data_dir = tmp_path / "data"
    _, server = start_gateway(gateway_settings(data_dir, fake_ollama_server.url, database_url=None))
    server.stop()
    target = new_database_url()
    assert target is not None
    assert _copy(data_dir, target).returncode == 0
    again = _copy(data_dir, target)
    assert again.returncode == 1
    [line] = again.stderr.splitlines()[1:]
    assert line.startswith("manage.py: ") and "already holds users: copy into an empty database" in line
    assert "Traceback" not in again.stderr


@pytest.mark.parametrize("target", ["mysql://db/gateway", "postgresql://db.internal"])
def test_a_target_that_is_not_a_postgres_database_is_refused_in_one_line(
    tmp_path, fake_ollama_server, target
):
    data_dir = tmp_path / "data"
    _, server = start_gateway(gateway_settings(data_dir, fake_ollama_server.url, database_url=None))
    server.stop()
    result = _copy(data_dir, target)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"manage.py: --to {target!r}: expected a postgresql:// URL"
    )

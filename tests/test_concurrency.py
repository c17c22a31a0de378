"""Many people at once: concurrent streams all complete, none waits on a connection pool; concurrent writes
leave a consistent database."""

import asyncio
import json
import sqlite3
import time
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import NullPool, create_engine, text
from sqlalchemy.exc import IntegrityError

from core.storage_errors import NotFound
from db.engine import Database, database_url
from tests import rawhttp
from tests.databases import execute, on_postgres
from tests.servers import NO_SIGN_IN_LIMITS, add_user
from tests.streams import chat_body

pytestmark = pytest.mark.storage

STREAMS = 300


async def _one_stream(http: httpx.AsyncClient, body: dict) -> list[dict]:
    async with http.stream("POST", "/chat", json=body) as response:
        assert response.status_code == 200
        return [json.loads(line) async for line in response.aiter_lines()]


async def _all_streams(url: str, headers: dict) -> list[list[dict]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(60, pool=None)
    body = chat_body(tokens=20, interval=0.1)  # two seconds of generation each
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as http:
        return await asyncio.gather(*(_one_stream(http, body) for _ in range(STREAMS)))


def test_300_concurrent_two_second_streams_all_complete(gateway, ollama):
    results = asyncio.run(_all_streams(gateway.url, gateway.admin_headers()))
    assert len(results) == STREAMS
    for lines in results:
        assert len(lines) == 21
        assert lines[-1]["done"] is True
    assert len(ollama.streams) == STREAMS


# Many people writing at once: users, keys, uploads and failed logins, all in one SQLite database.

NEW_USERS = 5  # each costs an Argon2 hash, as does each login below
SAME_EMAIL_ATTEMPTS = 4
KEYS = 60
UPLOADS = 40
FAILED_LOGINS = 10


async def _write_concurrently(url: str, headers: dict) -> dict[str, list[httpx.Response]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:
        calls = {
            "users": [
                http.post("/admin/users", json={"email": f"u{n}@example.com", "password": f"writer-{n}-pass"})
                for n in range(NEW_USERS)
            ],
            "same-email": [
                http.post("/admin/users", json={"email": "twin@example.com", "password": f"writer-{n}-pass"})
                for n in range(SAME_EMAIL_ATTEMPTS)
            ],
            "keys": [http.post("/keys", json={"name": f"key {n}"}) for n in range(KEYS)],
            "uploads": [
                http.post("/upload", files={"file": (f"f{n}.txt", b"x" * (n * 1000))}) for n in range(UPLOADS)
            ],
            "failed-logins": [
                http.post("/login", json={"email": f"nobody{n}@example.com", "password": "wrong-password"})
                for n in range(FAILED_LOGINS)
            ],
        }
        kinds = list(calls)
        results = await asyncio.gather(*(call for kind in kinds for call in calls[kind]))
    answers: dict[str, list[httpx.Response]] = {}
    for kind in kinds:
        answers[kind], results = results[: len(calls[kind])], results[len(calls[kind]) :]
    return answers


def test_concurrent_writes_leave_a_consistent_database(make_gateway, ollama):
    gateway = make_gateway(**NO_SIGN_IN_LIMITS)
    answers = asyncio.run(_write_concurrently(gateway.url, gateway.admin_headers()))
    for kind, responses in answers.items():
        assert all(response.status_code < 500 for response in responses), [
            (kind, r.status_code, r.text) for r in responses if r.status_code >= 500
        ]
    assert [r.status_code for r in answers["users"]] == [201] * NEW_USERS
    assert sorted(r.status_code for r in answers["same-email"]) == [201] + [409] * (SAME_EMAIL_ATTEMPTS - 1)
    assert [r.status_code for r in answers["keys"]] == [201] * KEYS
    assert [r.status_code for r in answers["uploads"]] == [201] * UPLOADS
    assert [r.status_code for r in answers["failed-logins"]] == [401] * FAILED_LOGINS

    settings = gateway.settings
    if not on_postgres():
        assert execute(settings, "PRAGMA integrity_check") == [("ok",)]
        assert execute(settings, "PRAGMA foreign_key_check") == []
    assert execute(settings, "SELECT count(*) FROM users") == [(1 + NEW_USERS + 1,)]
    assert execute(settings, "SELECT count(*) FROM api_keys") == [(KEYS,)]
    failed = execute(settings, "SELECT count(*) FROM login_attempts WHERE outcome = 'failed'")
    assert failed == [(FAILED_LOGINS,)]
    recorded = dict(execute(settings, "SELECT filename, size FROM uploads"))
    stored = {path.name: path.stat().st_size for path in gateway.settings.uploads_dir.iterdir()}
    assert recorded == stored
    assert sorted(recorded.values()) == [n * 1000 for n in range(UPLOADS)]


@contextmanager
def _write_lock_held_elsewhere(settings):
    """Another process (a backup, `manage.py`, another replica) holding what a new key's write needs, for
    longer than the busy timeout."""
    if not on_postgres():
        holder = sqlite3.connect(settings.database_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    engine = create_engine(database_url(settings.database_url, settings.data_dir), poolclass=NullPool)
    try:
        with engine.connect() as locking, locking.begin():
            locking.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
            yield
    finally:
        engine.dispose()


def test_a_database_locked_past_its_busy_timeout_is_503_not_500(make_gateway, ollama):
    gateway = make_gateway()
    headers = gateway.admin_headers()
    with _write_lock_held_elsewhere(gateway.settings):
        response = httpx.post(f"{gateway.url}/keys", json={"name": "k"}, headers=headers, timeout=30)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "busy" in response.json()["error"]
    assert httpx.post(f"{gateway.url}/keys", json={"name": "k"}, headers=headers).status_code == 201


def test_an_upload_finishing_after_its_owner_was_removed_is_401_and_keeps_nothing(make_gateway, ollama):
    gateway = make_gateway()
    token = add_user(gateway, "leaving@example.com")
    leaving = gateway.services.users.find_by_email("leaving@example.com")
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="late.txt"\r\n\r\n'
    data, closing = b"x" * 100_000, b"\r\n--b--\r\n"
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "multipart/form-data; boundary=b",
        "Content-Length": str(len(part) + len(data) + len(closing)),
    }
    with rawhttp.open_post(gateway.url, "/upload", headers) as sock:
        sock.sendall(part + data[:50_000])  # signed in, and half-way through the file...
        time.sleep(0.2)
        removed = httpx.delete(f"{gateway.url}/admin/users/{leaving.id}", headers=gateway.admin_headers())
        assert removed.status_code == 204  # ...when an admin removes the account
        sock.sendall(data[50_000:] + closing)
        response = rawhttp.read_response(sock)
    assert response.status_code == 401
    assert "error" in response.json()
    assert list(gateway.settings.uploads_dir.iterdir()) == []
    assert execute(gateway.settings, "SELECT count(*) FROM uploads") == [(0,)]


def test_a_key_for_an_account_removed_meanwhile_is_401_not_500(make_gateway, ollama):
    # POST /keys runs in a worker thread, after authentication: with the threads busy (Argon2 hashing),
    # an admin may remove the account in between.
    gateway = make_gateway()
    add_user(gateway, "gone@example.com")
    gone = gateway.services.users.find_by_email("gone@example.com")
    assert gateway.services.users.delete(gone.id)
    with pytest.raises(NotFound):
        gateway.services.keys.create(gone.id, "too late")
    assert gateway.services.keys.of_user(gone.id) == []


@pytest.mark.sqlite_only
def test_a_failed_commit_leaves_the_database_writable(tmp_path):
    # A COMMIT can fail (a full disk, a deferred constraint) and leave SQLite's transaction open, holding the
    # write lock: every later write, from any thread or process, would then wait and fail.
    db = Database(tmp_path / "gateway.sqlite3")
    db.migrate()
    with pytest.raises(IntegrityError), db.transaction() as session:
        # The constraint is checked at COMMIT, and fails there.
        session.execute(text("PRAGMA defer_foreign_keys = ON"))
        session.execute(
            text("INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES (404, 'k', 'p', 'h')")
        )
    with db.transaction() as session:
        session.execute(text("INSERT INTO users (email, password_hash, role) VALUES ('a@b.c', 'x', 'user')"))
    other_process = sqlite3.connect(tmp_path / "gateway.sqlite3", timeout=0.1)
    with other_process:
        other_process.execute("INSERT INTO users (email, password_hash, role) VALUES ('d@e.f', 'x', 'user')")
    other_process.close()
    with db.session() as session:
        assert session.execute(text("SELECT count(*) FROM users")).scalar_one() == 2
        assert session.execute(text("SELECT count(*) FROM api_keys")).scalar_one() == 0
    db.close()

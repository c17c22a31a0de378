"""The storage layer on SQLite: connections, failed commits, and the in-place upgrade of databases made by
the releases before Alembic."""

import io
import sqlite3
import threading
from collections.abc import Callable
from contextlib import contextmanager

import psutil
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from auth.bootstrap import ensure_admin
from auth.users import UserStore
from db.engine import Database, database_url
from db.legacy import MIGRATIONS
from db.migrations import current_revision, head_revision
from tests import databases
from tests.servers import gateway_settings
from uploads.store import UploadStore


def test_threads_that_come_and_go_leave_no_connection_behind(tmp_path):
    """Worker pools retire idle threads and start new ones all day long (anyio after 10 s idle): connections
    come from the engine's pool, so sixty threads leave no more open than the pool holds."""
    db = Database(tmp_path / "gateway.sqlite3")
    db.migrate()
    process = psutil.Process()
    before = process.num_fds()

    def read() -> None:
        with db.session() as session:
            session.execute(text("SELECT count(*) FROM users")).scalar_one()

    for _ in range(60):
        worker = threading.Thread(target=read)
        worker.start()
        worker.join()
    assert process.num_fds() - before < 10
    db.close()


class _FailingCommit(Database):
    """A database whose commits fail, as on a full disk."""

    @contextmanager
    def transaction(self):
        with super().transaction() as session:
            yield session
            session.flush()
            raise OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))


def test_an_upload_whose_record_fails_to_commit_leaves_no_file(tmp_path):
    working = Database(tmp_path / "gateway.sqlite3")
    working.migrate()
    with working.transaction() as session:
        session.execute(text("INSERT INTO users (email, password_hash, role) VALUES ('a@b', 'x', 'admin')"))
    working.close()
    db = _FailingCommit(tmp_path / "gateway.sqlite3")
    store = UploadStore(tmp_path / "uploads", db, max_bytes=1024)
    store.prepare()
    with pytest.raises(OperationalError):
        store.save(1, io.BytesIO(b"content"), "notes.txt", "text/plain")
    assert list(store.directory.iterdir()) == []
    db.close()


def _second_release_database(path) -> None:
    """A database as the second release left it: ids 1 to 3 given out, 3 removed again."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        for script in MIGRATIONS[:2]:
            db.executescript(script)
        db.execute("PRAGMA user_version = 2")
        for email, role in [
            ("ada@example.com", "admin"),
            ("bob@example.com", "user"),
            ("cy@example.com", "user"),
        ]:
            db.execute("INSERT INTO users (email, password_hash, role) VALUES (?, 'hash', ?)", (email, role))
        db.execute(
            "UPDATE users SET models = '[\"llama3.2:1b\"]', token_version = 4, disabled = 1 WHERE id = 2"
        )
        db.execute("DELETE FROM users WHERE id = 3")
        db.execute("INSERT INTO api_keys (user_id, name, prefix, key_hash) VALUES (2, 'job', 'ogw_x', 'h2')")
        db.execute(
            "INSERT INTO uploads (filename, owner_id, original_name, size, content_type)"
            " VALUES ('f', 2, 'f.txt', 1, 'text/plain')"
        )
        db.execute("INSERT INTO login_failures (email, address, failed_at) VALUES ('x', 'y', 1.0)")
    db.close()


def _rows(db: Database, sql: str) -> list[tuple]:
    with db.session() as session:
        return [tuple(row) for row in session.execute(text(sql))]


def test_a_second_release_database_is_upgraded_keeping_every_row(tmp_path):
    path = tmp_path / "gateway.sqlite3"
    _second_release_database(path)
    db = Database(path)
    db.migrate()
    assert _rows(db, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    with db.engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    assert _rows(db, "SELECT id, email, role, models, token_version, disabled FROM users ORDER BY id") == [
        (1, "ada@example.com", "admin", None, 0, 0),
        (2, "bob@example.com", "user", '["llama3.2:1b"]', 4, 1),
    ]
    assert _rows(db, "SELECT user_id, name, key_hash FROM api_keys") == [(2, "job", "h2")]
    assert _rows(db, "SELECT owner_id, filename FROM uploads") == [(2, "f")]
    assert _rows(db, "PRAGMA foreign_key_check") == []
    assert _rows(db, "PRAGMA foreign_keys") == [(1,)], "back on for everything after"
    db.close()


def test_a_database_made_by_the_last_release_before_alembic_is_taken_over_as_it_is(tmp_path):
    path = tmp_path / "gateway.sqlite3"
    with sqlite3.connect(path) as made:
        for script in MIGRATIONS:
            made.executescript(script)
        made.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        made.execute(
            "INSERT INTO users (email, password_hash, role) VALUES ('ada@example.com', 'h', 'admin')"
        )
    made.close()
    db = Database(path)
    db.migrate()
    db.migrate()  # and again at the next start: nothing left to do
    assert _rows(db, "SELECT email FROM users") == [("ada@example.com",)]
    with db.engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    db.close()


def test_after_the_upgrade_every_user_has_a_distinct_random_identity(tmp_path):
    path = tmp_path / "gateway.sqlite3"
    _second_release_database(path)
    db = Database(path)
    db.migrate()
    identities = [row[0] for row in _rows(db, "SELECT identity FROM users")]
    assert len(identities) == len(set(identities)) == 2
    assert all(len(identity) == 32 and int(identity, 16) >= 0 for identity in identities)
    db.close()


def test_after_the_upgrade_ids_are_never_reused_and_removals_still_cascade(tmp_path):
    path = tmp_path / "gateway.sqlite3"
    _second_release_database(path)
    db = Database(path)
    db.migrate()
    for table in ("users", "api_keys"):
        [(sql,)] = _rows(db, f"SELECT sql FROM sqlite_master WHERE name = '{table}'")  # noqa: S608
        assert "AUTOINCREMENT" in sql
    with db.transaction() as session:
        insert = "INSERT INTO users (email, password_hash, role) VALUES (:email, 'h', 'user')"
        session.execute(text(insert), {"email": "dee@example.com"})
        newest = session.execute(text("SELECT max(id) FROM users")).scalar_one()
        session.execute(text("DELETE FROM users WHERE id = :id"), {"id": newest})
        session.execute(text(insert), {"email": "eve@example.com"})
        eve = session.execute(text("SELECT id FROM users WHERE email = 'eve@example.com'")).scalar_one()
        assert eve > newest
        session.execute(
            text("DELETE FROM users WHERE id = 2")
        )  # bob: their key and upload record go with them
    assert _rows(db, "SELECT * FROM api_keys") == []
    assert _rows(db, "SELECT * FROM uploads") == []
    db.close()


def _all_at_once(replicas: list[Database], start: Callable[[Database], object]) -> list[BaseException]:
    """`start` run for every replica in a thread of its own, all released together; what they raised."""
    together = threading.Barrier(len(replicas))
    failures: list[BaseException] = []

    def run(db: Database) -> None:
        together.wait()
        try:
            start(db)
        except BaseException as exc:  # reported by the caller, whatever it is
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(db,)) for db in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return failures


@pytest.mark.storage
@pytest.mark.postgres_only
def test_replicas_starting_at_once_on_a_new_postgres_database_all_migrate_it():
    """Several gateways started together on one empty database: one creates the schema, the others wait for
    it and find it done (without a lock, two of three failed on a duplicate key in Postgres' catalogue)."""
    url = databases.new_database_url()
    assert url is not None
    replicas = [Database(url) for _ in range(3)]
    try:
        assert _all_at_once(replicas, Database.migrate) == []
        for db in replicas:
            with db.engine.connect() as conn:
                assert current_revision(conn) == head_revision()
    finally:
        for db in replicas:
            db.close()


@pytest.mark.storage
@pytest.mark.parametrize("configured", [True, False], ids=["configured password", "generated password"])
def test_replicas_starting_at_once_on_a_new_database_make_one_admin(tmp_path, capsys, configured):
    """Each replica finds no admin and makes one: one of them does, the others' same email conflicts, and
    for them the admin exists (without that, they stopped at start-up). A generated password is printed
    once, by the one that made it."""
    overrides = {} if configured else {"admin_password": None}
    settings = gateway_settings(tmp_path, "http://127.0.0.1:9", **overrides)
    url = database_url(settings.database_url, settings.data_dir)
    first = Database(url)
    first.migrate()
    first.close()
    replicas = [Database(url) for _ in range(3)]
    try:
        assert _all_at_once(replicas, lambda db: ensure_admin(settings, UserStore(db))) == []
        assert _rows(replicas[0], "SELECT email, role FROM users") == [(settings.admin_email, "admin")]
        printed = capsys.readouterr().err
        assert printed.count("password:") == (0 if configured else 1)
    finally:
        for db in replicas:
            db.close()

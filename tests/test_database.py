"""The SQLite layer: connections per thread, and what happens when threads come and go."""

import io
import sqlite3
import threading
from contextlib import contextmanager

import psutil
import pytest

from core.database import MIGRATIONS, Database
from uploads.store import UploadStore


def test_connections_of_finished_threads_are_closed(tmp_path):
    """Worker pools retire idle threads and start new ones all day long (anyio after 10 s idle): each new
    thread opens a connection, so those of finished threads must not stay open, or descriptors leak."""
    db = Database(tmp_path / "gateway.sqlite3")
    db.migrate()
    process = psutil.Process()
    before = process.num_fds()
    for _ in range(60):
        worker = threading.Thread(target=db.fetch_one, args=("SELECT COUNT(*) FROM users",))
        worker.start()
        worker.join()
    db.fetch_one("SELECT 1")  # any new use tidies up after finished threads
    assert process.num_fds() - before < 10
    db.close()


class _FailingCommit(Database):
    """A database whose commits fail, as on a full disk."""

    @contextmanager
    def transaction(self):
        with super().transaction() as conn:
            yield conn
            raise sqlite3.OperationalError("database or disk is full")


def test_an_upload_whose_record_fails_to_commit_leaves_no_file(tmp_path):
    working = Database(tmp_path / "gateway.sqlite3")
    working.migrate()
    with working.transaction() as conn:
        conn.execute("INSERT INTO users (email, password_hash, role) VALUES ('a@b', 'x', 'admin')")
    working.close()
    db = _FailingCommit(tmp_path / "gateway.sqlite3")
    store = UploadStore(tmp_path / "uploads", db, max_bytes=1024)
    store.prepare()
    with pytest.raises(sqlite3.OperationalError):
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


def test_a_second_release_database_is_upgraded_keeping_every_row(tmp_path):
    path = tmp_path / "gateway.sqlite3"
    _second_release_database(path)
    db = Database(path)
    db.migrate()
    conn = db.connection()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    users = conn.execute("SELECT id, email, role, models, token_version, disabled FROM users ORDER BY id")
    assert [tuple(row) for row in users] == [
        (1, "ada@example.com", "admin", None, 0, 0),
        (2, "bob@example.com", "user", '["llama3.2:1b"]', 4, 1),
    ]
    assert [tuple(row) for row in conn.execute("SELECT user_id, name, key_hash FROM api_keys")] == [
        (2, "job", "h2")
    ]
    assert [tuple(row) for row in conn.execute("SELECT owner_id, filename FROM uploads")] == [(2, "f")]
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1, "back on for everything after"
    db.close()


def test_after_the_upgrade_every_user_has_a_distinct_random_identity(tmp_path):
    path = tmp_path / "gateway.sqlite3"
    _second_release_database(path)
    db = Database(path)
    db.migrate()
    identities = [row[0] for row in db.fetch_all("SELECT identity FROM users")]
    assert len(identities) == len(set(identities)) == 2
    assert all(len(identity) == 32 and int(identity, 16) >= 0 for identity in identities)
    db.close()


def test_after_the_upgrade_ids_are_never_reused_and_removals_still_cascade(tmp_path):
    path = tmp_path / "gateway.sqlite3"
    _second_release_database(path)
    db = Database(path)
    db.migrate()
    for table in ("users", "api_keys"):
        row = db.fetch_one("SELECT sql FROM sqlite_master WHERE name = ?", (table,))
        assert row is not None
        assert "AUTOINCREMENT" in row["sql"]
    with db.transaction() as conn:
        conn.execute("INSERT INTO users (email, password_hash, role) VALUES ('dee@example.com', 'h', 'user')")
        newest = conn.execute("SELECT max(id) FROM users").fetchone()[0]
        conn.execute("DELETE FROM users WHERE id = ?", (newest,))
        conn.execute("INSERT INTO users (email, password_hash, role) VALUES ('eve@example.com', 'h', 'user')")
        assert conn.execute("SELECT id FROM users WHERE email = 'eve@example.com'").fetchone()[0] > newest
        conn.execute("DELETE FROM users WHERE id = 2")  # bob: their key and upload record go with them
    assert db.fetch_all("SELECT * FROM api_keys") == []
    assert db.fetch_all("SELECT * FROM uploads") == []
    db.close()

"""The SQLite layer: connections per thread, and what happens when threads come and go."""

import io
import sqlite3
import threading
from contextlib import contextmanager

import psutil
import pytest

from core.database import Database
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

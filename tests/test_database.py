"""The SQLite layer: connections per thread, and what happens when threads come and go."""

import threading

import psutil

from core.database import Database


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

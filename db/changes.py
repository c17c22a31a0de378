"""Whether another process changed the database: what lets the authentication cache (auth.cache) stay
correct when a change comes from elsewhere (`manage.py`, another worker, another replica).

This process's own changes are told by its stores as they commit them. For the others':
- SQLite: `PRAGMA data_version`, on a connection of its own, differs from its last value once any other
  connection has committed. It reads a counter in the write-ahead log's shared memory and waits for no lock
  (busy timeout 0; were it ever busy, that counts as changed), so it is asked on the event loop, per lookup:
  microseconds, not a round trip. Most commits are not about credentials (usage records are written twice
  a second), so when it moved, the counter that every credential change bumps (`credential_changes`) says
  whether to forget.
- Postgres: every transaction that changes credentials sends NOTIFY (delivered when it commits), and a thread
  LISTENs on a connection of its own. While it is not connected (at start, or after the server went away),
  everything counts as changed: the cache is not used until it listens again.
"""

import logging
import sqlite3
import threading

import psycopg

from db.engine import CREDENTIALS_CHANNEL, Database

logger = logging.getLogger("gateway.database")

LISTEN_POLL_SECONDS = 0.5
DATA_VERSION = "PRAGMA data_version"
CREDENTIALS_VERSION = "SELECT version FROM credential_changes"
RECONNECT_SECONDS = 1.0


class ChangeWatcher:
    """`changed()`: True when the database may have been changed by another process since last asked."""

    def changed(self) -> bool:
        return False

    def close(self) -> None:
        pass


class SqliteChanges(ChangeWatcher):
    def __init__(self, db: Database) -> None:
        assert db.path is not None
        self._conn = sqlite3.connect(db.path, isolation_level=None, check_same_thread=False, timeout=0)
        self._lock = threading.Lock()
        self._data_version = self._read(DATA_VERSION)
        self._credentials_version = self._read(CREDENTIALS_VERSION)

    def _read(self, query: str) -> int | None:
        try:
            with self._lock:
                return int(self._conn.execute(query).fetchone()[0])
        except (sqlite3.Error, TypeError):
            return None

    def changed(self) -> bool:
        data_version = self._read(DATA_VERSION)
        if data_version is not None and data_version == self._data_version:
            return False
        self._data_version = data_version
        # Something was committed: usage records, most of the time (twice a second under load). Credentials
        # changed only if their counter moved (db.engine.announce_credentials_changed).
        credentials_version = self._read(CREDENTIALS_VERSION)
        if credentials_version is not None and credentials_version == self._credentials_version:
            return False
        self._credentials_version = credentials_version
        return True

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresChanges(ChangeWatcher):
    def __init__(self, db: Database) -> None:
        url = db.url.set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        # Bumped by the listening thread only (on each notice, and on each new connection); `changed` compares
        # it with the last value it saw, so no notice is lost between the two threads.
        self._events = 0
        self._seen = -1
        self._listening = False
        self.listening = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="database-changes", daemon=True)
        self._thread.start()

    def changed(self) -> bool:
        if not self._listening:
            return True
        events = self._events
        if events == self._seen:
            return False
        self._seen = events
        return True

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CREDENTIALS_CHANNEL}")
                    self._events += 1  # whatever happened while not listening
                    self._listening = True
                    self.listening.set()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                            self._events += 1
            except psycopg.Error:
                if not self._stop.is_set():
                    logger.warning("not told of credential changes (reconnecting)", exc_info=True)
            finally:
                self._listening = False
                self.listening.clear()
            self._stop.wait(RECONNECT_SECONDS)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=LISTEN_POLL_SECONDS * 4)


def watch_changes(db: Database) -> ChangeWatcher:
    return SqliteChanges(db) if db.is_sqlite else PostgresChanges(db)

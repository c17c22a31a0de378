"""The SQLite database in `DATA_DIR`: users, their keys, uploads and sign-in attempts (never conversations).

Each thread gets its own connection (SQLite connections are not meant to be shared across threads).
Point reads by primary key run directly on the event loop: on a local WAL-mode database they take
microseconds, less than a hop to a worker thread would. Anything that writes runs in a worker thread.

Worker pools retire idle threads and start new ones all day long, so the connections of threads that have
ended are closed whenever a new one is opened: each holds file descriptors (the database and its log).
"""

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.private_files import create_private_file, make_private_directory

# Each entry upgrades the schema by one version; `PRAGMA user_version` records how far a database got.
# Append new steps, never edit old ones: existing databases have already run them.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        email TEXT NOT NULL UNIQUE COLLATE NOCASE,
        password_hash TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE TABLE uploads (
        filename TEXT PRIMARY KEY,
        owner_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        original_name TEXT NOT NULL,
        size INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE INDEX uploads_by_owner ON uploads (owner_id);
    """,
    # Teams: disabled users, per-user model allow-lists (JSON list, NULL = every model), a token version that
    # a password change bumps (older tokens stop working), API keys stored as hashes, failed logins.
    """
    ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN models TEXT;
    ALTER TABLE users ADD COLUMN token_version INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        last_used_at TEXT,
        expires_at TEXT
    );
    CREATE INDEX api_keys_by_user ON api_keys (user_id);
    CREATE TABLE login_failures (
        email TEXT NOT NULL COLLATE NOCASE,
        address TEXT NOT NULL,
        failed_at REAL NOT NULL
    );
    CREATE INDEX login_failures_by_email ON login_failures (email, failed_at);
    CREATE INDEX login_failures_by_address ON login_failures (address, failed_at);
    """,
    # Identities are never reused (issue 9, item 2). Without AUTOINCREMENT SQLite hands a removed row's id to
    # the next row, and a removed person's unexpired token, which named that id, signed in as whoever came
    # next. Both tables are rebuilt with AUTOINCREMENT (SQLite can't add it in place: the table-rebuild
    # procedure of https://sqlite.org/lang_altertable.html#otheralter, with foreign keys off, see `migrate`),
    # and every user gets a random 128-bit identity, what tokens name from now on: ids freed before this
    # upgrade can't be known, so AUTOINCREMENT alone can't protect tokens issued before it. The identity
    # is random in SQLite itself, so that every way of adding a user gets one.
    """
    CREATE TABLE users_v3 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        identity TEXT NOT NULL UNIQUE DEFAULT (lower(hex(randomblob(16)))),
        email TEXT NOT NULL UNIQUE COLLATE NOCASE,
        password_hash TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        disabled INTEGER NOT NULL DEFAULT 0,
        models TEXT,
        token_version INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO users_v3 (id, email, password_hash, role, created_at, disabled, models, token_version)
        SELECT id, email, password_hash, role, created_at, disabled, models, token_version FROM users;
    DROP TABLE users;
    ALTER TABLE users_v3 RENAME TO users;
    CREATE TABLE api_keys_v3 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
        last_used_at TEXT,
        expires_at TEXT
    );
    INSERT INTO api_keys_v3 (id, user_id, name, prefix, key_hash, created_at, last_used_at, expires_at)
        SELECT id, user_id, name, prefix, key_hash, created_at, last_used_at, expires_at FROM api_keys;
    DROP TABLE api_keys;
    ALTER TABLE api_keys_v3 RENAME TO api_keys;
    CREATE INDEX api_keys_by_user ON api_keys (user_id);
    """,
    # Sign-in limits (issue 9, item 4; see auth.throttle): every attempt is recorded, pending until its
    # password check is done, and the addresses each person signed in from are remembered. AUTOINCREMENT:
    # an attempt is resolved by its id after the check, and that id must still be the same attempt's.
    """
    DROP TABLE login_failures;
    CREATE TABLE login_attempts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        email TEXT NOT NULL COLLATE NOCASE,
        address TEXT NOT NULL,
        at REAL NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('pending', 'failed', 'succeeded', 'forgiven'))
    );
    CREATE INDEX login_attempts_by_email ON login_attempts (email, at);
    CREATE INDEX login_attempts_by_address ON login_attempts (address, at);
    CREATE INDEX login_attempts_by_time ON login_attempts (at);
    CREATE TABLE known_addresses (
        user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        last_success REAL NOT NULL,
        PRIMARY KEY (user_id, address)
    );
    CREATE INDEX known_addresses_by_time ON known_addresses (last_success);
    """,
)


# How long a write waits for the database before giving up ("database is locked", answered 503).
BUSY_TIMEOUT_SECONDS = 5.0


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            self._local.conn = conn
            with self._lock:
                self._close_those_of_ended_threads()
                self._connections[threading.current_thread()] = conn
        return conn

    def _close_those_of_ended_threads(self) -> None:
        for thread in [thread for thread in self._connections if not thread.is_alive()]:
            self._connections.pop(thread).close()

    def fetch_one(self, sql: str, params: tuple = ()) -> sqlite3.Row | None:
        return self.connection().execute(sql, params).fetchone()

    def fetch_all(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return self.connection().execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed as a whole, or rolled back as a whole.

        SQLite lets one writer in at a time and makes the others poll, sleeping up to 100 ms between tries,
        until the busy timeout: with a hundred concurrent writers most of them sleep while the lock is free,
        and the last ones time out ("database is locked"). This process's writers queue on a lock instead,
        each let in as soon as the one before is done; SQLite's own waiting is left for other processes
        (`manage.py`, a backup)."""
        if not self._write_lock.acquire(timeout=BUSY_TIMEOUT_SECONDS):
            raise sqlite3.OperationalError("database is locked (waited for this process's other writers)")
        try:
            conn = self.connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself failed (a full disk, a deferred constraint): SQLite may keep the
                # transaction open, and with it the write lock every other writer waits for.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            self._write_lock.release()

    def migrate(self) -> None:
        """Create or upgrade the schema in place; existing rows are kept."""
        make_private_directory(self.path.parent)
        # SQLite creates the -wal and -shm files with the database file's mode: a database file created
        # 0600 here, before SQLite creates it with 0644 under the usual umask, keeps all three private.
        create_private_file(self.path)
        conn = self.connection()
        conn.execute("PRAGMA journal_mode = WAL")
        # Rebuilding a table that others reference (users) needs foreign keys off, or dropping the old table
        # would delete every row that references it (ON DELETE CASCADE). The pragma is a no-op inside a
        # transaction, so it is switched around the migration's one, and the references are checked before
        # it commits.
        conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with self.transaction():
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                for step, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in script.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {step}")
                upgraded = version < len(MIGRATIONS)
                broken = conn.execute("PRAGMA foreign_key_check").fetchall() if upgraded else []
                if broken:
                    raise sqlite3.IntegrityError(f"the schema upgrade left broken references: {broken[:5]}")
        finally:
            conn.execute("PRAGMA foreign_keys = ON")

    def close(self) -> None:
        with self._lock:
            for conn in self._connections.values():
                conn.close()
            self._connections.clear()
        self._local = threading.local()

"""The SQLite schema as the releases before Alembic built it, step by step (`PRAGMA user_version`).

On SQLite, the baseline revision (db/migrations/versions/0001_baseline.py) runs the steps a database has not
run yet: a new database runs them all, one made by an earlier release the rest (both landed schema versions,
and the steps between), and one already at the last step none. So every SQLite database, new or upgraded in
place, has exactly today's schema, and Alembic takes over from there.
"""

from sqlalchemy import Connection

# Each entry upgrades the schema by one version; `PRAGMA user_version` records how far a database got.
# Frozen: these are the steps the releases before Alembic ran; new changes are Alembic revisions.
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
    # procedure of https://sqlite.org/lang_altertable.html#otheralter, with foreign keys off, see
    # `Database.migrate`), and every user gets a random 128-bit identity, what tokens name from now on: ids
    # freed before this upgrade can't be known, so AUTOINCREMENT alone can't protect tokens issued before
    # it. The identity is random in SQLite itself, so that every way of adding a user gets one.
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


def upgrade(conn: Connection) -> None:
    """Run the steps the database has not run, inside the migration's transaction, with foreign keys off
    (`Database.migrate`); the references are checked before it commits."""
    version = conn.exec_driver_sql("PRAGMA user_version").scalar_one()
    for step, script in enumerate(MIGRATIONS[version:], start=version + 1):
        for statement in script.split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        conn.exec_driver_sql(f"PRAGMA user_version = {step}")
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"the schema upgrade left broken references: {broken[:5]}")

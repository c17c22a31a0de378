"""The database: one SQLAlchemy engine on SQLite (the default: a file in DATA_DIR, nothing to install) or on
Postgres (DATABASE_URL: one database for every replica), with the same models and migrations on both.

Why synchronous drivers on a bounded thread pool, not async drivers (aiosqlite, asyncpg):
- SQLite has no asynchronous driver: aiosqlite, and SQLAlchemy's async engine over it, run each connection in
  a thread of its own anyway. A thread pool is what SQLite's async support is, said plainly.
- One code path serves every caller: the gateway, `manage.py`, the first start, Alembic (synchronous itself)
  and the tests, which read and write the stores directly. Async stores would need a second, blocking copy.
- What must not starve is bounded explicitly: every database call from the event loop goes through `run`,
  onto this database's own pool of POOL_SIZE threads, each with a connection waiting for it (the connection
  pool has as many). Password hashing has its own slots (auth.passwords), file copies run in anyio's pool: a
  burst of either leaves the database's threads free, and a burst of slow queries queues here, never on the
  event loop, and never takes the threads hashing and uploads need.
- The hot path stays off the database altogether: authentication is answered from a cache (auth.cache).

SQLite lets one writer in at a time. This process's writers queue on a lock, each let in as soon as the one
before is done, rather than polling SQLite's lock (with a hundred writers, most slept while it was free and
the last ones timed out); SQLite's own waiting is left for other processes (`manage.py`, a backup). A write
that waits longer than BUSY_TIMEOUT_SECONDS raises `Busy`, answered 503 with Retry-After. On Postgres, rows
are locked instead, and a lock held longer than the same timeout is `Busy` too.
"""

import asyncio
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    CursorResult,
    Engine,
    Result,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from core.private_files import create_private_file, make_private_directory
from core.storage_errors import Busy

# How long a write waits for the database before giving up ("database is locked", answered 503).
BUSY_TIMEOUT_SECONDS = 5.0
# Threads for database work, and connections for them (as many again for callers outside the pool).
POOL_SIZE = 8
SQLITE_FILE = "gateway.sqlite3"
# Where Postgres tells every process that credentials changed (db.changes).
CREDENTIALS_CHANNEL = "gateway_credentials"
# The advisory lock key migrations hold on Postgres (any number the gateway uses for nothing else).
MIGRATION_LOCK = 0x6F6C6C61


P = ParamSpec("P")
T = TypeVar("T")


def database_url(setting: str | None, data_dir: Path) -> URL:
    """The engine's URL: DATABASE_URL's Postgres, through psycopg 3, or SQLite in DATA_DIR."""
    if not setting:
        return URL.create("sqlite+pysqlite", database=str(data_dir / SQLITE_FILE))
    url = make_url(setting)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    # Transactions are begun by `_sqlite_begin`, not by Python's sqlite3 module (which would begin them late,
    # and never as IMMEDIATE): SQLAlchemy's recipe for SQLite.
    dbapi_connection.isolation_level = None
    dbapi_connection.execute("PRAGMA foreign_keys = ON")
    dbapi_connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")


def _sqlite_begin(conn: Connection) -> None:
    # A write takes SQLite's write lock at once: begun deferred, it would take it at its first write, and
    # fail there, without waiting, if a reader had meanwhile moved on (SQLITE_BUSY_SNAPSHOT).
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


class Database:
    def __init__(self, url: URL | str | Path, pool_size: int = POOL_SIZE) -> None:
        if isinstance(url, Path):
            url = URL.create("sqlite+pysqlite", database=str(url))
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.path = Path(self.url.database) if self.is_sqlite and self.url.database else None
        pool = {"pool_size": pool_size, "max_overflow": pool_size, "pool_timeout": BUSY_TIMEOUT_SECONDS}
        if self.is_sqlite:
            self.engine: Engine = create_engine(
                self.url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_SECONDS}, **pool
            )
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            options = self.url.query.get("options", "")
            options = options if isinstance(options, str) else " ".join(options)
            lock_timeout = f"-c lock_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}"
            self.engine = create_engine(
                self.url.difference_update_query(["options"]),
                connect_args={"options": f"{options} {lock_timeout}".strip(), "connect_timeout": 5},
                # No ping before each use: it would double every round trip. A connection the server dropped
                # fails once (503, come back: `_is_busy`), then SQLAlchemy replaces its pooled connections.
                pool_recycle=3600,
                **pool,
            )
        self._write_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="database")

    @property
    def name(self) -> str:
        """Where the database is, for messages: the file, or the URL without its password."""
        shown = self.url.set(drivername=self.url.get_backend_name())
        return str(self.path) if self.path else shown.render_as_string(hide_password=True)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call a blocking store function on the database's own threads (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(function, *args, **kwargs))

    def submit(self, function: Callable[..., object], *args: object) -> None:
        """Run a blocking function on the database's threads without waiting for it (bookkeeping)."""
        self._executor.submit(function, *args)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session to read in; what it returned stays readable after it is closed."""
        with self._translated(), Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction: committed as a whole when the block ends, or rolled back as a whole."""
        with self._translated(), self._writer(), self.engine.connect() as conn:
            conn.execution_options(write=True)
            with Session(conn, expire_on_commit=False) as session, session.begin():
                yield session

    @contextmanager
    def _writer(self) -> Iterator[None]:
        if not self.is_sqlite:
            yield
            return
        if not self._write_lock.acquire(timeout=BUSY_TIMEOUT_SECONDS):
            raise Busy("database is locked (waited for this process's other writers)")
        try:
            yield
        finally:
            self._write_lock.release()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except PoolTimeout as exc:
            raise Busy(f"no database connection was free in time: {exc}") from exc
        except OperationalError as exc:
            if self._is_busy(exc):
                raise Busy(str(exc.orig)) from exc
            raise

    def _is_busy(self, exc: OperationalError) -> bool:
        if self.is_sqlite:
            return "locked" in str(exc.orig) or "busy" in str(exc.orig)
        # lock_not_available (lock_timeout), or the server can't be reached or is shutting down.
        state = getattr(exc.orig, "sqlstate", None) or ""
        return state == "55P03" or state.startswith(("08", "57P"))

    def serialize(self, session: Session, name: str) -> None:
        """Let one transaction at a time past this point, in every process, until it ends: for checks that
        read, then write (the last admin, sign-in limits). SQLite's writers are one at a time already."""
        if not self.is_sqlite:
            session.execute(select(func.pg_advisory_xact_lock(zlib.crc32(name.encode()))))

    def announce_credentials_changed(self, session: Session) -> None:
        """Tell every other process, when this transaction commits, that credentials changed, so that their
        authentication caches forget them (db.changes): on SQLite, by bumping the counter they look at once
        the database changed (any commit, a usage record's too, changes it); on Postgres, by NOTIFY."""
        if self.is_sqlite:
            session.execute(text("UPDATE credential_changes SET version = version + 1"))
        else:
            session.execute(text(f"NOTIFY {CREDENTIALS_CHANNEL}"))

    def same_email(self, column: Any, email: str) -> ColumnElement[bool]:
        """`column` holds `email`, whatever the letter case (see db.models.EmailText)."""
        if self.is_sqlite:
            return column == email  # the column's NOCASE collation, and its index
        return func.lower(column) == func.lower(email)

    def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the schema in place (Alembic); existing rows are kept."""
        from db.migrations import upgrade_to_head

        if self.path is not None:
            make_private_directory(self.path.parent)
            # SQLite creates the -wal and -shm files with the database file's mode: a database file created
            # 0600 here, before SQLite creates it with 0644 under the usual umask, keeps all three private.
            create_private_file(self.path)
        with self._translated(), self._writer(), self.engine.connect() as conn:
            raw = conn.connection.driver_connection if self.is_sqlite else None
            if raw is not None:
                raw.execute("PRAGMA journal_mode = WAL")
                # Rebuilding a table that others reference (users) needs foreign keys off, or dropping the
                # old table would delete every row that references it (ON DELETE CASCADE). The pragma is a
                # no-op inside a transaction, so it is switched around the migration's one; the baseline
                # checks the references before it commits (db.legacy).
                raw.execute("PRAGMA foreign_keys = OFF")
            try:
                conn.execution_options(write=True)
                with conn.begin():
                    if not self.is_sqlite:
                        # Replicas started at once on a new database would each create the same tables
                        # (a duplicate key in Postgres' catalogue): the first migrates, the others wait for
                        # its commit, then find the schema at head. Released when the transaction ends.
                        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                    upgrade_to_head(conn, revision)
            finally:
                if raw is not None:
                    raw.execute("PRAGMA foreign_keys = ON")

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()


def affected(result: Result[Any]) -> int:
    """How many rows an UPDATE or DELETE changed (a DML statement's result is a CursorResult)."""
    return cast(CursorResult[Any], result).rowcount


def database_problem(exc: SQLAlchemyError) -> str:
    """The driver's own first line about what went wrong (a server that can't be reached, a refused login),
    without SQLAlchemy's statement and links."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__

"""The database each test's gateway gets: SQLite in its DATA_DIR (the default), or, under
`pytest --database=postgresql`, a schema of its own in a Postgres database made for this run and dropped at
its end (`gateway_test_<random>`).

The server is TEST_POSTGRES_URL's (`tests/with_postgres.sh` sets it: the machine's own server, or a
throwaway one it starts), by default the one on 127.0.0.1:5432 with trust authentication.
"""

import os
import secrets
from itertools import count

from sqlalchemy import Connection, NullPool, create_engine, text
from sqlalchemy.engine import URL, make_url

from core.settings import Settings
from db.engine import database_url

SERVER = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class PostgresRun:
    """One throwaway database for the whole test run; a schema in it for each gateway."""

    def __init__(self, server: str = SERVER) -> None:
        self.server = make_url(server).set(drivername="postgresql+psycopg")
        self.name = f"gateway_test_{secrets.token_hex(4)}"
        self._schemas = count(1)
        with self._autocommit(self.server) as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = self.server.set(database=self.name)
        self._engine = create_engine(self.url, isolation_level="AUTOCOMMIT", pool_size=1)

    @staticmethod
    def _autocommit(url: URL) -> Connection:
        return create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool).connect()

    def new_database_url(self) -> str:
        """A fresh, empty schema, as a DATABASE_URL whose connections use it."""
        schema = f"gateway_{next(self._schemas)}"
        with self._engine.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = self.url.set(drivername="postgresql").update_query_dict({"options": f"-csearch_path={schema}"})
        return url.render_as_string(hide_password=False)

    def end(self) -> None:
        self._engine.dispose()
        with self._autocommit(self.server) as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))


_run: PostgresRun | None = None


def start(kind: str) -> None:
    global _run
    if kind == "postgresql":
        _run = PostgresRun()


def end() -> None:
    global _run
    if _run is not None:
        _run.end()
        _run = None


def on_postgres() -> bool:
    return _run is not None


def new_database_url() -> str | None:
    """DATABASE_URL for a new gateway: None (SQLite in its DATA_DIR), or a new Postgres schema."""
    return _run.new_database_url() if _run is not None else None


def execute(settings: Settings, sql: str, params: dict | None = None) -> list[tuple]:
    """Run one statement on a gateway's database, whichever it is, from outside the gateway (a connection of
    its own, committed at once); its rows, if it returns any."""
    engine = create_engine(database_url(settings.database_url, settings.data_dir), poolclass=NullPool)
    if engine.dialect.name == "postgresql":
        options = make_url(settings.database_url or "").query.get("options")
        engine = create_engine(
            engine.url.difference_update_query(["options"]),
            poolclass=NullPool,
            connect_args={"options": options} if isinstance(options, str) else {},
        )
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params or {})
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()

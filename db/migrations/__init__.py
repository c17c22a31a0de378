"""The schema's history as Alembic revisions (versions/), run at every start: a new database is created, an
older one upgraded in place.

The first revision is the schema the releases before Alembic built (on SQLite it runs their steps, db.legacy,
so databases made by those releases upgrade in place). To change the schema, add a revision to versions/ that
follows the newest (`down_revision`); on SQLite, alter tables in batch mode (`op.batch_alter_table`), which
env.py turns on, since SQLite can't alter most things in place.
"""

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

HERE = Path(__file__).parent


def _config(conn: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = conn
    return config


def upgrade_to_head(conn: Connection, revision: str = "head") -> None:
    """Run every revision the database has not run, on `conn`, inside its transaction (up to `revision`:
    tests make the schema of an earlier release)."""
    command.upgrade(_config(conn), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()

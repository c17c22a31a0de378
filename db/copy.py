"""Moving a gateway's data to another database (`manage.py copy-database`): SQLite to Postgres, when one
gateway becomes several replicas, or back.

Every row of every table is copied, ids included (tokens name identities, keys and uploads name their owner's
id), in one transaction on the target: a copy that fails leaves the target as it was. The target's id
counters are moved past the highest id the source ever gave out, deleted rows' ids included, so no id is given
twice (issue 9, item 2). Uploaded files stay in the uploads folder; only their records move.
"""

from sqlalchemy import Connection, Table, func, insert, select, text

from core.storage_errors import Conflict
from db.engine import Database
from db.models import TABLES, Base

BATCH = 1000
# The tables whose ids come from a counter that never goes back (AUTOINCREMENT, identity columns).
_COUNTED = ("users", "api_keys", "login_attempts", "hosts", "audit_entries")


def copy_database(source: Database, target: Database) -> dict[str, int]:
    """Copy everything from `source` into `target`, which must hold no rows yet (its schema is created or
    upgraded first). Returns how many rows each table had."""
    source.migrate()
    target.migrate()
    copied: dict[str, int] = {}
    with source.engine.connect() as reading, target.transaction() as session:
        writing = session.connection()
        for table in TABLES:
            if writing.execute(select(func.count()).select_from(table)).scalar_one():
                raise Conflict(f"{target.name} already holds {table.name}: copy into an empty database")
        last_ids = _last_ids(source, reading)
        for table in TABLES:
            copied[table.name] = _copy_rows(table, reading, writing)
        for name in _COUNTED:
            _continue_after(target, writing, name, last_ids[name])
    return copied


def _copy_rows(table: Table, reading: Connection, writing: Connection) -> int:
    count = 0
    result = reading.execution_options(yield_per=BATCH).execute(select(table))
    for rows in result.mappings().partitions():
        writing.execute(insert(table), [dict(row) for row in rows])
        count += len(rows)
    return count


def _last_ids(db: Database, conn: Connection) -> dict[str, int]:
    """The highest id each counted table ever gave out, rows deleted since included."""
    tables = Base.metadata.tables
    last = {
        name: conn.execute(select(func.coalesce(func.max(tables[name].c.id), 0))).scalar_one()
        for name in _COUNTED
    }
    if db.is_sqlite:
        for name, seq in conn.execute(text("SELECT name, seq FROM sqlite_sequence")):
            if name in last:
                last[name] = max(last[name], seq)
    else:
        for name in _COUNTED:
            given = conn.execute(
                text("SELECT pg_sequence_last_value(pg_get_serial_sequence(:name, 'id'))"), {"name": name}
            ).scalar_one()
            last[name] = max(last[name], given or 0)
    return last


def _continue_after(db: Database, conn: Connection, name: str, last_id: int) -> None:
    if db.is_sqlite:
        conn.execute(text("DELETE FROM sqlite_sequence WHERE name = :name"), {"name": name})
        conn.execute(
            text("INSERT INTO sqlite_sequence (name, seq) VALUES (:name, :seq)"),
            {"name": name, "seq": last_id},
        )
    else:
        conn.execute(
            text("SELECT setval(pg_get_serial_sequence(:name, 'id'), :value, :called)"),
            {"name": name, "value": max(last_id, 1), "called": last_id > 0},
        )

"""The audit entries in the database: written as each admin action succeeds, read newest first.

Every method blocks: from async code, call it through `Database.run`.

An entry is written once the action it tells of has succeeded, in a transaction of its own: the stores
that act (auth.users, auth.api_keys, fleet.store) each own their transaction, and some actions are in no
transaction at all (changing an OLLAMA_URL host until the next start, pulling a model through Ollama). So an
action that failed is never recorded; one whose entry then fails to be written (a database gone away
between the two) is answered as that failure, never as a success the trail does not know of.
"""

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from audit.actor import Actor
from audit.query import AuditQuery
from db.engine import Database
from db.models import AuditEntry

__all__ = ["AuditEntry", "AuditPage", "AuditStore"]

logger = logging.getLogger("gateway.audit")


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    next: int | None  # the `before` of the next page; None: this is the last


class AuditStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self, actor: Actor, action: str, target: str | None = None, details: dict[str, Any] | None = None
    ) -> AuditEntry:
        entry = AuditEntry(
            actor_id=actor.id,
            actor=actor.name,
            action=str(action),
            target=target,
            details=details,
            address=actor.address,
        )
        with self._db.transaction() as session:
            session.add(entry)
        return entry

    def record_or_log(
        self, actor: Actor, action: str, target: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        """`record`, for a caller that does not wait for it (`Database.submit`): a failure goes to the log,
        where the operator sees it, since nobody is left to answer it to."""
        try:
            self.record(actor, action, target, details)
        except Exception:
            logger.exception("an audit entry was not written: %s %s by %s", action, target, actor.name)

    def read(self, query: AuditQuery) -> AuditPage:
        """Newest first (ids only grow: SQLite's AUTOINCREMENT, Postgres' identity column)."""
        statement = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(query.limit + 1)
        if query.since is not None:
            statement = statement.where(AuditEntry.at >= query.since)  # stamps sort as text
        if query.until is not None:
            statement = statement.where(AuditEntry.at <= query.until)
        if query.action is not None:
            if query.action.endswith("."):
                statement = statement.where(AuditEntry.action.startswith(query.action, autoescape=True))
            else:
                statement = statement.where(AuditEntry.action == query.action)
        if query.actor_id is not None:
            statement = statement.where(AuditEntry.actor_id == query.actor_id)
        if query.before is not None:
            statement = statement.where(AuditEntry.id < query.before)
        with self._db.session() as session:
            entries = list(session.scalars(statement))
        if len(entries) <= query.limit:
            return AuditPage(entries, None)
        del entries[query.limit :]
        return AuditPage(entries, entries[-1].id)

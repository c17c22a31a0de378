"""The usage records in the database (`usage_records`): written in batches, summed for the reports and the
quotas. Every method blocks: from async code, call it through `Database.run` (the writer does)."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, case, func, insert, select

from db.engine import Database
from db.models import UsageRow, User
from usage.periods import local_day
from usage.records import Outcome, UsageRecord

GROUPS = {
    "user": UsageRow.user_id,
    "key": UsageRow.key_id,
    "model": UsageRow.model,
    "host": UsageRow.host,
    "day": UsageRow.day,
}
FIGURES = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "slot_seconds",
    "cancelled",
    "errors",
    "estimated",
)
ERRORS = (Outcome.UPSTREAM_ERROR, Outcome.ERROR, Outcome.TIMEOUT)


@dataclass(frozen=True)
class Spent:
    """What a person or a key used in a period, as the quotas count it: requests that were sent to Ollama,
    their tokens and slot-seconds."""

    requests: int = 0
    tokens: int = 0
    slot_seconds: float = 0.0


@dataclass(frozen=True)
class Report:
    rows: list[dict[str, Any]]
    totals: dict[str, Any]


class UsageStore:
    def __init__(self, db: Database, zone: ZoneInfo) -> None:
        self.db = db
        self.zone = zone

    def add_all(self, records: list[UsageRecord]) -> None:
        rows = [
            {
                "at": record.at.timestamp(),
                "day": local_day(record.at, self.zone),
                "user_id": record.user_id,
                "key_id": record.key_id,
                "surface": record.surface,
                "model": record.model,
                "host": record.host,
                "band": record.band,
                "outcome": str(record.outcome),
                "status": record.status,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "slot_seconds": record.slot_seconds,
                "load_seconds": record.load_seconds,
                "queue_seconds": record.queue_seconds,
                "ttfb_seconds": record.ttfb_seconds,
                "duration_seconds": record.duration_seconds,
                "estimated": record.estimated,
                "model_load": record.model_load,
                "request_id": record.request_id,
            }
            for record in records
        ]
        with self.db.transaction() as session:
            session.execute(insert(UsageRow), rows)

    def spent(self, since: datetime, *, user_id: int | None = None, key_id: int | None = None) -> Spent:
        subject = UsageRow.user_id == user_id if key_id is None else UsageRow.key_id == key_id
        with self.db.session() as session:
            requests, tokens, seconds = session.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(_tokens()), 0),
                    func.coalesce(func.sum(UsageRow.slot_seconds), 0.0),
                ).where(subject, UsageRow.at >= since.timestamp(), UsageRow.host.is_not(None))
            ).one()
        return Spent(int(requests), int(tokens), float(seconds or 0.0))

    def report(
        self,
        group_by: list[str],
        since: datetime | None = None,
        until: datetime | None = None,
        user_id: int | None = None,
    ) -> Report:
        """Sums per group (`GROUPS`), and over everything in range; `user_id` keeps one person's."""
        where: list[ColumnElement[bool]] = []
        if since is not None:
            where.append(UsageRow.at >= since.timestamp())
        if until is not None:
            where.append(UsageRow.at < until.timestamp())
        if user_id is not None:
            where.append(UsageRow.user_id == user_id)
        columns: list[Any] = [GROUPS[name].label(name) for name in group_by]
        sums: list[Any] = [
            func.count().label("requests"),
            func.coalesce(func.sum(UsageRow.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(UsageRow.completion_tokens), 0).label("completion_tokens"),
            func.coalesce(func.sum(UsageRow.slot_seconds), 0.0).label("slot_seconds"),
            func.count(case((UsageRow.outcome == Outcome.CANCELLED.value, 1))).label("cancelled"),
            func.count(case((UsageRow.outcome.in_([str(error) for error in ERRORS]), 1))).label("errors"),
            func.count(case((UsageRow.estimated, 1))).label("estimated"),
        ]
        with self.db.session() as session:
            totals = session.execute(select(*sums).where(and_(True, *where))).one()._asdict()
            rows = []
            if columns:
                query = select(*columns, *sums).where(and_(True, *where)).group_by(*columns)
                query = query.order_by(*columns)
                rows = [row._asdict() for row in session.execute(query)]
            if "user" in group_by and rows:
                ids = {row["user"] for row in rows}
                emails = dict(session.execute(select(User.id, User.email).where(User.id.in_(ids))).all())
                for row in rows:
                    row["email"] = emails.get(row["user"])
        return Report([_rounded(row) for row in rows], _rounded(totals))


def _tokens() -> ColumnElement[int]:
    return func.coalesce(UsageRow.prompt_tokens, 0) + func.coalesce(UsageRow.completion_tokens, 0)


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    for name in FIGURES:
        row[name] = round(float(row[name]), 3) if name == "slot_seconds" else int(row[name])
    return row

"""The usage records in the database (`usage_records`): written in batches, summed for the reports and the
quotas. Every method blocks: from async code, call it through `Database.run` (the writer does)."""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, and_, case, func, select

from db.engine import Database
from db.models import UsageRow, User
from usage.periods import Period, current_span, local_day
from usage.records import Outcome, UsageRecord

EPOCH = datetime.fromtimestamp(0, UTC)
# The columns `add_all` writes, in its rows' order.
COLUMNS = (
    "at",
    "day",
    "user_id",
    "key_id",
    "surface",
    "model",
    "host",
    "band",
    "outcome",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "slot_seconds",
    "load_seconds",
    "queue_seconds",
    "ttfb_seconds",
    "duration_seconds",
    "estimated",
    "model_load",
    "request_id",
)
# SQLite binds at most 32,766 values to one statement: 20 columns by 500 rows stay well under.
ROWS_PER_INSERT = 500

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
        self._day = (EPOCH, EPOCH, "")  # the day's start and end, and its name (`_day_of`)

    def row(self, record: UsageRecord) -> tuple[object, ...]:
        """A record as the row `add_rows` writes. The writer keeps rows, not records, until it writes them:
        a tuple of plain values is let go by the garbage collector's tracking, so the records waiting (a
        thousand at a time under load) never add to the collections every request pays for."""
        return (
            record.at.timestamp(),
            self._day_of(record.at),
            record.user_id,
            record.key_id,
            record.surface,
            record.model,
            record.host,
            record.band,
            record.outcome.value,
            record.status,
            record.prompt_tokens,
            record.completion_tokens,
            record.slot_seconds,
            record.load_seconds,
            record.queue_seconds,
            record.ttfb_seconds,
            record.duration_seconds,
            record.estimated,
            record.model_load,
            record.request_id,
        )

    def add_all(self, records: list[UsageRecord]) -> None:
        self.add_rows([self.row(record) for record in records])

    def add_rows(self, rows: list[tuple[object, ...]]) -> None:
        """Write rows (`row`), many to one INSERT. Measured in the bench: the database driver lets go of
        Python's interpreter lock for each statement it runs and must take it back after, and a statement
        per record, in this thread, held up the event loop's requests; a statement per `ROWS_PER_INSERT`
        records costs them little."""
        with self.db.transaction() as session:
            connection = session.connection()
            placeholder = "?" if connection.dialect.paramstyle == "qmark" else "%s"
            row = "(" + ", ".join([placeholder] * len(COLUMNS)) + ")"
            for first in range(0, len(rows), ROWS_PER_INSERT):
                batch = rows[first : first + ROWS_PER_INSERT]
                values = ", ".join([row] * len(batch))
                flat = tuple(value for one in batch for value in one)
                # Only the column names and placeholders above are in the text; every value is bound.
                statement = f"INSERT INTO usage_records ({', '.join(COLUMNS)}) VALUES {values}"  # noqa: S608
                connection.exec_driver_sql(statement, flat)

    def _day_of(self, moment: datetime) -> str:
        """The day in the gateway's time zone, worked out once a day rather than once a record."""
        start, end, day = self._day
        if not start <= moment < end:
            span = current_span(Period.DAY, self.zone, moment)
            start, end, day = self._day = (span.start, span.end, local_day(span.start, self.zone))
        return day

    def spent(
        self,
        since: datetime,
        *,
        user_id: int | None = None,
        key_id: int | None = None,
        until: datetime | None = None,
    ) -> Spent:
        """What a person (or a key) used from `since`, up to `until` (excluded) if given."""
        subject = UsageRow.user_id == user_id if key_id is None else UsageRow.key_id == key_id
        where = [subject, UsageRow.at >= since.timestamp(), UsageRow.host.is_not(None)]
        if until is not None:
            where.append(UsageRow.at < until.timestamp())
        with self.db.session() as session:
            requests, tokens, seconds = session.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(_tokens()), 0),
                    func.coalesce(func.sum(UsageRow.slot_seconds), 0.0),
                ).where(*where)
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

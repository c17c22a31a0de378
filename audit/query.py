"""Which entries a reader asks for (`GET /admin/audit`): a time range, an action or a kind of action, one
actor, and a page of them, newest first."""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from db.models import STAMP_FORMAT

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MOMENT_EXAMPLE = "2026-05-01 or 2026-05-01T12:00:00Z"


@dataclass(frozen=True)
class AuditQuery:
    since: str | None = None  # a stamp (db.models.stamp): entries at or after it
    until: str | None = None  # a stamp: entries at or before it
    action: str | None = None  # exact, or ending in "." for every action of that kind ("user.")
    actor_id: int | None = None
    limit: int = DEFAULT_LIMIT
    before: int | None = None  # an entry id: the entries older than it (the next page)


def moment(text: str, *, end_of_day: bool = False) -> str:
    """An ISO-8601 date or date-time as a stamp, in UTC (a time with no offset is taken as UTC). A bare date
    is its first second, or with `end_of_day` its last, so that `until=2026-05-01` takes in that whole day.
    ValueError if it is neither."""
    text = text.strip()
    try:
        if "T" not in text and " " not in text and len(text) <= len("2026-05-01"):
            day = date.fromisoformat(text)
            return _stamp(datetime.combine(day, time.max if end_of_day else time.min, UTC))
        parsed = datetime.fromisoformat(text)
        return _stamp(parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC))
    except (ValueError, OverflowError):
        raise ValueError(f"expected an ISO-8601 date or date-time such as {MOMENT_EXAMPLE}") from None


def _stamp(moment: datetime) -> str:
    # db.models.stamp's format, with the year always four digits: strftime writes the year 999 as "999",
    # which would sort after "2026" as text.
    return f"{moment.year:04d}" + moment.strftime(STAMP_FORMAT.removeprefix("%Y"))

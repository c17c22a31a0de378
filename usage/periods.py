"""Days and months in the gateway's time zone (TIME_ZONE): what a quota's period and a report's `day` are."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True)
class Span:
    start: datetime
    end: datetime  # the next period's start

    def seconds_left(self, now: datetime) -> int:
        """Whole seconds until the period resets (at least 1): what Retry-After says."""
        # In UTC: Python subtracts two datetimes of the same zone by their wall clocks, which would give a
        # day that changes its clocks 24 hours.
        left = self.end.astimezone(UTC) - now.astimezone(UTC)
        return max(int(left.total_seconds() + 0.999), 1)


def current_span(period: Period, zone: ZoneInfo, now: datetime | None = None) -> Span:
    local = (now or datetime.now(UTC)).astimezone(zone)
    if period is Period.DAY:
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        following = (start + timedelta(days=1, hours=2)).replace(hour=0)  # safe across a DST change
    else:
        start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (start + timedelta(days=32)).replace(day=1)
    # Rebuilt from the wall clock: a midnight across a DST change keeps its own offset.
    return Span(_wall(start, zone), _wall(following, zone))


def _wall(moment: datetime, zone: ZoneInfo) -> datetime:
    return datetime(moment.year, moment.month, moment.day, tzinfo=zone)


def local_day(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%Y-%m-%d")

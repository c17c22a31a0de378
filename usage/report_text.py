"""A usage report's query as a person writes it (the API's query string, manage.py's command line), and the
report as CSV or as a table: one reading and one rendering for `GET /me/usage`, `GET /admin/usage` and
`manage.py usage`."""

import csv
import io
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from usage.store import FIGURES, GROUPS, Report


class ReportQueryError(ValueError):
    """A group or a moment that can't be read; the message says which and why."""


def read_groups(group_by: str | None) -> list[str]:
    """`user,model` as the list of groups, each once, in order."""
    names = [name.strip() for name in (group_by or "").split(",") if name.strip()]
    for name in names:
        if name not in GROUPS:
            raise ReportQueryError(f"group_by: unknown group {name!r} (any of: {', '.join(GROUPS)})")
    return list(dict.fromkeys(names))


def read_moment(text: str | None, name: str, zone: ZoneInfo) -> datetime | None:
    """An ISO-8601 date-time, or a day (from its start in `zone`); one without an offset is in `zone`."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=zone)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReportQueryError(f"{name}: expected an ISO-8601 date or date-time, got {text[:40]!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)


def read_range(
    since: str | None, until: str | None, zone: ZoneInfo
) -> tuple[datetime | None, datetime | None]:
    # An empty range (until before since) is an empty report, not a mistake.
    return read_moment(since, "since", zone), read_moment(until, "until", zone)


def columns(groups: list[str]) -> list[str]:
    return [*groups, *(["email"] if "user" in groups else []), *FIGURES]


def as_csv(report: Report, groups: list[str]) -> str:
    """One row per group (no totals: a spreadsheet sums them)."""
    fields = columns(groups)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows([_cell(row.get(name)) for name in fields] for row in report.rows)
    return out.getvalue()


def as_table(report: Report, groups: list[str]) -> str:
    """Aligned columns, figures to the right, and a last line of totals."""
    fields = columns(groups)
    lines: list[list[str]] = [fields]
    lines += [[_shown(row.get(name)) for name in fields] for row in report.rows]
    total_row = {**report.totals, **({fields[0]: "total"} if groups else {})}
    lines.append([_shown(total_row.get(name, "")) for name in fields])
    if groups:
        lines.insert(-1, ["-" * len(field) for field in fields])
    widths = [max(len(line[column]) for line in lines) for column in range(len(fields))]
    figures = set(FIGURES)
    return "\n".join(
        "  ".join(
            cell.rjust(width) if name in figures else cell.ljust(width)
            for name, cell, width in zip(fields, line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _cell(value: object) -> object:
    """A model name or an email as text a spreadsheet shows, never a formula it runs."""
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return value

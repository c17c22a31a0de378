"""Usage reports: `GET /me/usage` (yours) and `GET /admin/usage` (everyone's), summed per group over a time
range, as JSON or CSV (usage.store)."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response

from auth.users import User
from core.errors import GatewayError
from routes.dependencies import AppServices, CurrentUser, admin_user
from routes.schemas import MAX_ROW_ID, MOMENT_SCHEMA, UsageReport, errors
from usage.periods import current_span
from usage.quotas import Quota
from usage.report_text import ReportQueryError, as_csv, read_groups, read_range
from usage.store import GROUPS, Report

router = APIRouter(tags=["usage"])

SINCE = "From this moment (ISO-8601 date-time) or day (a date, from its start in TIME_ZONE); default: all"
UNTIL = "Up to this moment or day (excluded); default: now"
GROUP_BY = f"Comma-separated, any of: {', '.join(GROUPS)}; none: totals only"
_GROUP = "|".join(GROUPS)
GROUP_BY_SCHEMA = {"pattern": f"^(({_GROUP})(,({_GROUP}))*)?$"}
Format = Literal["json", "csv"]
CSV_TOO: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}}}
}


@router.get(
    "/me/usage",
    response_model=UsageReport,
    responses={**errors(400, 401, 422), **CSV_TOO},
    summary="What you used: requests, tokens and slot-seconds, per model, key, host or day; and your quota",
)
async def my_usage(
    user: CurrentUser,
    services: AppServices,
    since: Annotated[str | None, Query(description=SINCE, json_schema_extra=MOMENT_SCHEMA)] = None,
    until: Annotated[str | None, Query(description=UNTIL, json_schema_extra=MOMENT_SCHEMA)] = None,
    group_by: Annotated[str | None, Query(description=GROUP_BY, json_schema_extra=GROUP_BY_SCHEMA)] = None,
    format: Annotated[Format, Query(description="json, or csv (one row per group)")] = "json",
) -> Response:
    report, groups = await _report(services, group_by, since, until, user.id)
    quota = await _quota_now(services, user)
    return _answer(report, groups, format, "my-usage.csv", {"quota": quota})


@router.get(
    "/admin/usage",
    response_model=UsageReport,
    responses={**errors(400, 401, 403, 422), **CSV_TOO},
    dependencies=[Depends(admin_user)],
    summary="What everyone used (or one person: user_id), per user, key, model, host or day",
)
async def everyones_usage(
    services: AppServices,
    since: Annotated[str | None, Query(description=SINCE, json_schema_extra=MOMENT_SCHEMA)] = None,
    until: Annotated[str | None, Query(description=UNTIL, json_schema_extra=MOMENT_SCHEMA)] = None,
    group_by: Annotated[str | None, Query(description=GROUP_BY, json_schema_extra=GROUP_BY_SCHEMA)] = None,
    user_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
    format: Annotated[Format, Query(description="json, or csv (one row per group)")] = "json",
) -> Response:
    report, groups = await _report(services, group_by, since, until, user_id)
    return _answer(report, groups, format, "usage.csv", {})


async def _report(
    services: AppServices, group_by: str | None, since: str | None, until: str | None, user_id: int | None
) -> tuple[Report, list[str]]:
    """The report, and the groups it was asked for (in the order asked)."""
    try:
        groups = read_groups(group_by)
        start, end = read_range(since, until, services.usage_store.zone)
    except ReportQueryError as exc:
        raise GatewayError(400, str(exc)) from None
    await services.usage.writer.flush()  # what just ended is in the report
    return await services.db.run(services.usage_store.report, groups, start, end, user_id), groups


async def _quota_now(services: AppServices, user: User) -> dict[str, Any] | None:
    """Your quota, what you used of it in its current period (on every replica), and when that period
    ends."""
    quota = Quota.from_stored(user.quota)
    if quota is None:
        return None
    span = current_span(quota.period, services.usage_store.zone)
    spent = await services.usage.quotas.used("user", user.id, quota)
    return {
        **(user.quota or {}),
        "used": {
            "requests": spent.requests,
            "tokens": spent.tokens,
            "slot_seconds": round(spent.slot_seconds, 3),
        },
        "resets_at": span.end.isoformat(),
    }


def _answer(
    report: Report, groups: list[str], format: Format, filename: str, extra: dict[str, Any]
) -> Response:
    if format == "json":
        return JSONResponse({"rows": report.rows, "totals": report.totals, **extra})
    return Response(
        as_csv(report, groups),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )

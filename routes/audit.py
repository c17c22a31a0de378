"""The audit trail in the web layer: `GET /admin/audit` reads it (admins only), `note` and
`note_model_management` are how the admin routes and the relay's model management add to it."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from starlette.types import Scope

from audit.actions import model_action
from audit.actor import Actor
from audit.query import DEFAULT_LIMIT, MAX_LIMIT, MOMENT_EXAMPLE, AuditQuery, moment
from auth.users import User
from core.client_address import client_address
from core.errors import GatewayError
from routes.dependencies import AppServices, Services, admin_user
from routes.schemas import (
    AUDIT_ACTION_PATTERN,
    MAX_ROW_ID,
    MOMENT_SCHEMA,
    AuditEntryOut,
    AuditPageOut,
    errors,
)
from upstream.bodies import read_body_fields
from upstream.go_json import BodyRefused

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[Depends(admin_user)], responses=errors(401, 403)
)

# The body fields that name the model a management request is about, in the order Ollama reads them (`name`
# is what older clients send; `source` is what /api/copy copies).
_MODEL_FIELDS = ("model", "name", "source")


async def note(
    services: Services, actor: Actor, action: str, target: str, details: dict[str, Any] | None = None
) -> None:
    """Add an entry for an action that has just succeeded (audit.store says why not in its transaction)."""
    await services.db.run(services.audit.record, actor, action, target, details)


async def note_model_management(
    services: Services, scope: Scope, user: User, path: str, body: object, named_host: str | None
) -> None:
    """One entry for a model management request Ollama accepted (pull, push, create, copy, delete, a blob),
    written without holding up its answer, which may be a stream of progress that lasts minutes."""
    actor = Actor(user.id, user.email, client_address(scope, services.settings.trusted_proxies))
    target, details = await _managed_model(scope, body)
    details["host"] = named_host.strip() if named_host else None  # None: the only host
    services.db.submit(services.audit.record_or_log, actor, model_action(path), target, details)


async def _managed_model(scope: Scope, body: object) -> tuple[str | None, dict[str, Any]]:
    """The model a request names, as Ollama reads it, and where a copy goes."""
    if not isinstance(body, bytes):  # a blob, streamed: named by its digest, in the path
        return next(iter(scope.get("path_params", {}).values()), None), {}
    try:
        fields = await read_body_fields(body, (*_MODEL_FIELDS, "destination"))
        target = next((value for name in _MODEL_FIELDS if (value := fields.string(name))), None)
        destination = fields.string("destination")
    except (GatewayError, BodyRefused):  # Ollama took it all the same: the entry just names no model
        return None, {}
    return target, {"destination": destination} if destination else {}


def _moment(name: str, text: str | None, *, end_of_day: bool = False) -> str | None:
    if text is None:
        return None
    try:
        return moment(text, end_of_day=end_of_day)
    except ValueError as exc:
        raise GatewayError(422, f"query.{name}: {exc}") from None


@router.get(
    "/audit",
    response_model=AuditPageOut,
    responses=errors(422),
    summary="The audit trail of admin actions, newest first (filters: time, action, actor; paged)",
)
async def read_audit(
    services: AppServices,
    since: Annotated[
        str | None,
        Query(
            max_length=64,
            description=f"Entries at or after it: {MOMENT_EXAMPLE} (UTC unless it says)",
            json_schema_extra=MOMENT_SCHEMA,
        ),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            max_length=64,
            description="Entries at or before it; a date takes in that whole day",
            json_schema_extra=MOMENT_SCHEMA,
        ),
    ] = None,
    action: Annotated[
        str | None,
        Query(
            max_length=100,
            pattern=AUDIT_ACTION_PATTERN,
            description="An action (user.update), or every action of a kind, ending in a dot (user.)",
        ),
    ] = None,
    actor_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID, description="Who acted")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ROW_ID, description="An entry's id: the entries older than it")
    ] = None,
) -> AuditPageOut:
    query = AuditQuery(
        since=_moment("since", since),
        until=_moment("until", until, end_of_day=True),
        action=action,
        actor_id=actor_id,
        limit=limit,
        before=before,
    )
    page = await services.db.run(services.audit.read, query)
    entries = [AuditEntryOut.model_validate(entry) for entry in page.entries]
    return AuditPageOut(entries=entries, next=page.next)

"""The admin API's Ollama hosts: see them, add, change, drain and remove them at run time (fleet.changes).
For admins only (403 for others). A host's credentials are used, never shown (nor written in the audit
trail: routes.audit)."""

from typing import Any

from fastapi import APIRouter, Depends, Response

from audit.actions import Action
from audit.details import every_field, sent_fields
from fleet.store import HostChange
from routes.audit import note
from routes.dependencies import Acting, AppServices, admin_user
from routes.schemas import HostId, HostOut, HostPatch, NewHost, errors

router = APIRouter(
    prefix="/admin/hosts", tags=["admin"], dependencies=[Depends(admin_user)], responses=errors(401, 403)
)


@router.get("", response_model=list[HostOut], summary="Every Ollama host: health, models, slots and load")
async def list_hosts(services: AppServices) -> list[dict[str, Any]]:
    return services.fleet.snapshot()


@router.post(
    "",
    status_code=201,
    response_model=HostOut,
    responses=errors(400, 409, 413, 422),
    summary="Add an Ollama host (stored); it takes work once its check has listed its models",
)
async def add_host(body: NewHost, services: AppServices, actor: Acting) -> dict[str, Any]:
    host = await services.host_changes.add(body.name, body.url, slots=body.slots, enabled=body.enabled)
    await note(services, actor, Action.HOST_ADD, f"host {host.name}", {"id": host.id, **every_field(body)})
    return services.fleet.describe(host)


@router.patch(
    "/{host_id}",
    response_model=HostOut,
    responses=errors(400, 404, 409, 413, 422),
    summary="Change a host: name, URL, slots, enabled, draining (of OLLAMA_URL's: enabled and draining only)",
)
async def change_host(
    host_id: HostId, body: HostPatch, services: AppServices, actor: Acting
) -> dict[str, Any]:
    change = HostChange(
        name=body.name,
        url=body.url,
        enabled=body.enabled,
        draining=body.draining,
        slots=body.slots,
        learn_slots="slots" in body.model_fields_set and body.slots is None,
    )
    host = await services.host_changes.change(host_id, change)
    # The fields sent, whichever HostPatch has (as for a person's PATCH: routes.admin).
    details = {"id": host.id, **sent_fields(body)}
    await note(services, actor, Action.HOST_CHANGE, f"host {host.name}", details)
    return services.fleet.describe(host)


@router.delete(
    "/{host_id}",
    status_code=204,
    responses=errors(404, 409, 422),
    summary="Remove a stored host: no new work goes there; requests running there finish",
)
async def remove_host(host_id: HostId, services: AppServices, actor: Acting) -> Response:
    host = services.fleet.hosts.by_id.get(host_id)
    await services.host_changes.remove(host_id)
    # Its name as this process knew it (one another replica added may not be known here yet).
    target = f"host {host.name}" if host is not None else f"host {host_id}"
    await note(services, actor, Action.HOST_REMOVE, target, {"id": host_id})
    return Response(status_code=204)

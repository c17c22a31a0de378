"""The admin API's Ollama hosts: see them, add, change, drain and remove them at run time (fleet.changes).
For admins only (403 for others). A host's credentials are used, never shown."""

from typing import Any

from fastapi import APIRouter, Depends, Response

from fleet.store import HostChange
from routes.dependencies import AppServices, admin_user
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
    responses=errors(409, 413, 422),
    summary="Add an Ollama host (stored); it takes work once its check has listed its models",
)
async def add_host(body: NewHost, services: AppServices) -> dict[str, Any]:
    host = await services.host_changes.add(body.name, body.url, slots=body.slots, enabled=body.enabled)
    return services.fleet.describe(host)


@router.patch(
    "/{host_id}",
    response_model=HostOut,
    responses=errors(404, 409, 413, 422),
    summary="Change a host: name, URL, slots, enabled, draining (of OLLAMA_URL's: enabled and draining only)",
)
async def change_host(host_id: HostId, body: HostPatch, services: AppServices) -> dict[str, Any]:
    change = HostChange(
        name=body.name,
        url=body.url,
        enabled=body.enabled,
        draining=body.draining,
        slots=body.slots,
        learn_slots="slots" in body.model_fields_set and body.slots is None,
    )
    host = await services.host_changes.change(host_id, change)
    return services.fleet.describe(host)


@router.delete(
    "/{host_id}",
    status_code=204,
    responses=errors(404, 409, 422),
    summary="Remove a stored host: no new work goes there; requests running there finish",
)
async def remove_host(host_id: HostId, services: AppServices) -> Response:
    await services.host_changes.remove(host_id)
    return Response(status_code=204)

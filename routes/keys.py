"""API keys for scripts: POST /keys, GET /keys, DELETE /keys/{id}, each on your own keys. Creating and
revoking one is in the audit trail (routes.audit), never the key itself."""

from fastapi import APIRouter, Response

from audit.actions import Action
from audit.details import every_field
from auth.api_keys import ApiKey
from core.errors import GatewayError, Unauthorized
from core.storage_errors import NotFound
from routes.audit import note
from routes.dependencies import Acting, AppServices, CurrentUser
from routes.schemas import CreatedKey, KeyId, KeyInfo, NewKey, errors

router = APIRouter(tags=["keys"])


@router.post(
    "/keys",
    status_code=201,
    response_model=CreatedKey,
    responses=errors(400, 401, 413, 422),
    summary="Create an API key (the full key is shown only in this answer)",
)
async def create_key(body: NewKey, user: CurrentUser, services: AppServices, actor: Acting) -> CreatedKey:
    try:
        record, key = await services.db.run(
            services.keys.create, user.id, body.name, body.expires_in_days, body.priority
        )
    except NotFound:
        # The account was removed after this request was authenticated.
        raise Unauthorized("this account no longer exists") from None
    details = {**every_field(body), "user_id": user.id}
    await note(services, actor, Action.KEY_CREATE, f"key {record.id}", details)
    return CreatedKey(**KeyInfo.model_validate(record).model_dump(), key=key)


@router.get(
    "/keys", response_model=list[KeyInfo], responses=errors(401), summary="Your API keys (no secrets)"
)
async def list_keys(user: CurrentUser, services: AppServices) -> list[ApiKey]:
    return await services.db.run(services.keys.of_user, user.id)


@router.delete(
    "/keys/{key_id}", status_code=204, responses=errors(401, 404, 422), summary="Revoke one of your keys"
)
async def revoke_key(key_id: KeyId, user: CurrentUser, services: AppServices, actor: Acting) -> Response:
    if not await services.db.run(services.keys.revoke, key_id, user_id=user.id):
        raise GatewayError(404, "no such key")
    await note(services, actor, Action.KEY_REVOKE, f"key {key_id}")
    return Response(status_code=204)

"""The admin API: people and their keys. Every route here is for admins only (403 for others); every change
that succeeds is in the audit trail (routes.audit)."""

from functools import partial

from fastapi import APIRouter, Depends, Response

from audit.actions import Action
from audit.details import every_field, sent_fields
from auth.users import User
from core.errors import GatewayError
from routes.accounts import delete_account
from routes.audit import note
from routes.dependencies import Acting, AppServices, admin_user
from routes.schemas import (
    KeyId,
    KeyInfo,
    KeyPatch,
    NewUser,
    OwnedKeyInfo,
    UserId,
    UserOut,
    UserPatch,
    errors,
)

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[Depends(admin_user)], responses=errors(401, 403)
)

NO_SUCH_USER = "no such user"
NO_SUCH_KEY = "no such key"


@router.post(
    "/users",
    status_code=201,
    response_model=UserOut,
    responses=errors(400, 409, 413, 422),
    summary="Add a person",
)
async def create_user(body: NewUser, services: AppServices, actor: Acting) -> User:
    password_hash = await services.hasher.hash(body.password)
    user = await services.db.run(
        services.users.create_with_hash, body.email, password_hash, body.role, body.models
    )
    await note(services, actor, Action.USER_CREATE, f"user {user.id}", every_field(body))
    return user


@router.get("/users", response_model=list[UserOut], summary="Everyone")
async def list_users(services: AppServices) -> list[User]:
    return await services.db.run(services.users.all)


@router.get("/users/{user_id}", response_model=UserOut, responses=errors(404, 422), summary="One person")
async def get_user(user_id: UserId, services: AppServices) -> User:
    user = await services.db.run(services.users.get, user_id)
    if user is None:
        raise GatewayError(404, NO_SUCH_USER)
    return user


@router.patch(
    "/users/{user_id}",
    response_model=UserOut,
    responses=errors(400, 404, 409, 413, 422),
    summary="Change role, model allow-list, disabled, password, caps in the queue or quota",
)
async def update_user(user_id: UserId, body: UserPatch, services: AppServices, actor: Acting) -> User:
    sent = body.model_fields_set
    password_hash = await services.hasher.hash(body.password) if body.password is not None else None
    user = await services.db.run(
        partial(
            services.users.update,
            user_id,
            role=body.role,
            models=body.models,
            clear_models="models" in sent and body.models is None,
            disabled=body.disabled,
            password_hash=password_hash,
            max_inflight=body.max_inflight,
            max_waiting=body.max_waiting,
            default_inflight="max_inflight" in sent and body.max_inflight is None,
            default_waiting="max_waiting" in sent and body.max_waiting is None,
            quota=body.quota.model_dump() if body.quota is not None else None,
            clear_quota="quota" in sent and body.quota is None,
        )
    )
    if user is None:
        raise GatewayError(404, NO_SUCH_USER)
    if "quota" in sent and body.quota is None:
        await services.usage.quotas.forget("user", user_id)
    # Whatever fields the body sent, by their names in UserPatch: a field added to it later is in the trail
    # with no change here (the password is said as "changed": audit.details).
    await note(services, actor, Action.USER_UPDATE, f"user {user_id}", sent_fields(body))
    return user


@router.delete(
    "/users/{user_id}",
    status_code=204,
    responses=errors(404, 409, 422),
    summary="Remove a person, their keys and uploads",
)
async def delete_user(user_id: UserId, services: AppServices, actor: Acting) -> Response:
    # Who it was, for the trail: once removed, "user 3" names nobody one could look up.
    user = await services.db.run(services.users.get, user_id)
    if user is None or not await services.db.run(delete_account, services.users, services.uploads, user_id):
        raise GatewayError(404, NO_SUCH_USER)
    await note(services, actor, Action.USER_DELETE, f"user {user_id}", {"email": user.email})
    return Response(status_code=204)


@router.get("/keys", response_model=list[OwnedKeyInfo], summary="Every API key (no secrets)")
async def list_all_keys(services: AppServices) -> list[OwnedKeyInfo]:
    return [
        OwnedKeyInfo(**KeyInfo.model_validate(key).model_dump(), user_id=key.user_id, email=email)
        for key, email in await services.db.run(services.keys.all)
    ]


@router.patch(
    "/keys/{key_id}",
    response_model=OwnedKeyInfo,
    responses=errors(400, 404, 413, 422),
    summary="Set or clear anyone's key's quota",
)
async def update_key(key_id: KeyId, body: KeyPatch, services: AppServices, actor: Acting) -> OwnedKeyInfo:
    if "quota" in body.model_fields_set:
        quota = body.quota.model_dump() if body.quota is not None else None
        if await services.db.run(services.keys.set_quota, key_id, quota) is None:
            raise GatewayError(404, NO_SUCH_KEY)
        if quota is None:
            await services.usage.quotas.forget("key", key_id)
        await note(services, actor, Action.KEY_UPDATE, f"key {key_id}", sent_fields(body))
    for key, email in await services.db.run(services.keys.all, key_id):
        return OwnedKeyInfo(**KeyInfo.model_validate(key).model_dump(), user_id=key.user_id, email=email)
    raise GatewayError(404, NO_SUCH_KEY)


@router.delete("/keys/{key_id}", status_code=204, responses=errors(404, 422), summary="Revoke anyone's key")
async def revoke_any_key(key_id: KeyId, services: AppServices, actor: Acting) -> Response:
    if not await services.db.run(services.keys.revoke, key_id):
        raise GatewayError(404, NO_SUCH_KEY)
    await note(services, actor, Action.KEY_REVOKE, f"key {key_id}")
    return Response(status_code=204)

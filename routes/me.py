"""GET /me and POST /me/password: the signed-in user's own account."""

from fastapi import APIRouter, Request

from auth.users import User
from core.client_address import client_address
from routes.dependencies import AppServices, CurrentUser
from routes.schemas import PasswordChange, TokenResponse, UserOut, errors

router = APIRouter(tags=["me"])


@router.get(
    "/me", response_model=UserOut, responses=errors(401), summary="Who you are, and the models you may use"
)
async def me(user: CurrentUser) -> User:
    return user


@router.post(
    "/me/password",
    response_model=TokenResponse,
    responses=errors(400, 401, 403, 413, 422, 429),
    summary="Change your password: every token issued before stops working; a new one is returned",
)
async def change_my_password(
    body: PasswordChange, user: CurrentUser, services: AppServices, request: Request
) -> TokenResponse:
    address = client_address(request.scope, services.settings.trusted_proxies)
    changed = await services.passwords.change_password(
        user, body.current_password, body.new_password, address
    )
    issued = services.signer.issue(changed.identity, changed.token_version)
    return TokenResponse(access_token=issued.access_token, expires_in=issued.expires_in)

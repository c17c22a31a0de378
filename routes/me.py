"""GET /me and POST /me/password: the signed-in user's own account."""

from fastapi import APIRouter

from auth.dependencies import CurrentUser
from auth.login import change_password
from core.services import AppServices
from routes.schemas import PasswordChange, TokenResponse, UserOut, errors

router = APIRouter(tags=["me"])


@router.get(
    "/me", response_model=UserOut, responses=errors(401), summary="Who you are, and the models you may use"
)
async def me(user: CurrentUser) -> dict:
    return user.public()


@router.post(
    "/me/password",
    response_model=TokenResponse,
    responses=errors(400, 401, 403, 422),
    summary="Change your password: every token issued before stops working; a new one is returned",
)
def change_my_password(body: PasswordChange, user: CurrentUser, services: AppServices) -> TokenResponse:
    changed = change_password(services.users, user, body.current_password, body.new_password)
    issued = services.signer.issue(changed.identity, changed.token_version)
    return TokenResponse(access_token=issued.access_token, expires_in=issued.expires_in)

"""POST /login: email and password in, bearer JWT out."""

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from auth.credentials import MAX_FIELD_LENGTH, read_credentials
from auth.login import sign_in
from core.services import AppServices
from routes.schemas import LoginRequest, TokenResponse, errors

router = APIRouter(tags=["auth"])

_FIELD = {"type": "string", "minLength": 1, "maxLength": MAX_FIELD_LENGTH}
_LOGIN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": LoginRequest.model_json_schema()},
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {"username": _FIELD, "password": _FIELD},
                    "required": ["username", "password"],
                }
            },
        },
    }
}


@router.post(
    "/login",
    response_model=TokenResponse,
    responses=errors(400, 401, 422, 429),
    openapi_extra=_LOGIN_BODY,
    summary="Exchange an email and password for a bearer token",
)
async def login(request: Request, services: AppServices) -> TokenResponse:
    credentials = await read_credentials(request)
    address = request.client.host if request.client else "unknown"
    # Argon2 takes a tenth of a second of CPU: keep it off the event loop.
    user = await run_in_threadpool(
        sign_in, services.users, services.throttle, credentials.email, credentials.password, address
    )
    issued = services.signer.issue(user.identity, user.token_version)
    return TokenResponse(access_token=issued.access_token, expires_in=issued.expires_in)

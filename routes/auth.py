"""POST /login: email and password in, bearer JWT out."""

from fastapi import APIRouter, Request

from core.client_address import client_address
from observe.request_log import request_log
from routes.credentials import MAX_FIELD_LENGTH, read_credentials
from routes.dependencies import AppServices
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
    responses=errors(400, 401, 413, 422, 429),
    openapi_extra=_LOGIN_BODY,
    summary="Exchange an email and password for a bearer token",
)
async def login(request: Request, services: AppServices) -> TokenResponse:
    credentials = await read_credentials(request)
    address = client_address(request.scope, services.settings.trusted_proxies)
    user = await services.passwords.sign_in(credentials.email, credentials.password, address)
    if (entry := request_log(request.scope)) is not None:
        entry.user_id = user.id  # who signed in, for the access log
    issued = services.signer.issue(user.identity, user.token_version)
    return TokenResponse(access_token=issued.access_token, expires_in=issued.expires_in)

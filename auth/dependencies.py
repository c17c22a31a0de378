"""Who is calling: the `CurrentUser` dependency every protected route declares.

The header is parsed here and nowhere else. The two security schemes are declared so that `/docs`
offers both ways in: the OAuth2 password form (posts to `/login`) and pasting a bearer token.
"""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer, OAuth2PasswordBearer

from auth.tokens import InvalidToken
from auth.users import User
from core.errors import Unauthorized
from core.services import AppServices

_password_flow = OAuth2PasswordBearer(tokenUrl="login", auto_error=False, scheme_name="login")
_bearer = HTTPBearer(auto_error=False, scheme_name="bearer", description="A token from POST /login")


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("missing bearer token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected an 'Authorization: Bearer <token>' header")
    return token.strip()


async def current_user(
    request: Request,
    services: AppServices,
    _documented_flow: Annotated[str | None, Depends(_password_flow)],
    _documented_bearer: Annotated[object, Depends(_bearer)],
) -> User:
    token = bearer_token(request)
    try:
        claims = services.signer.verify(token)
    except InvalidToken:
        raise Unauthorized("invalid or expired token") from None
    user = services.users.get(claims.user_id)
    if user is None:
        raise Unauthorized("invalid or expired token")
    return user


CurrentUser = Annotated[User, Depends(current_user)]

"""The `CurrentUser` dependency every protected FastAPI route declares.

Both security schemes are declared so that `/docs` offers both ways in: the OAuth2 password form (which posts
to `/login`) and pasting a bearer token. The header itself is checked by `auth.authenticate`.
"""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer, OAuth2PasswordBearer

from auth.authenticate import authenticate
from auth.users import User
from core.services import AppServices

password_flow = OAuth2PasswordBearer(tokenUrl="login", auto_error=False, scheme_name="login")
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer", description="A token from POST /login")


async def current_user(
    request: Request,
    services: AppServices,
    _documented_flow: Annotated[str | None, Depends(password_flow)],
    _documented_bearer: Annotated[object, Depends(bearer_scheme)],
) -> User:
    return authenticate(request.headers.get("authorization"), services.signer, services.users)


CurrentUser = Annotated[User, Depends(current_user)]

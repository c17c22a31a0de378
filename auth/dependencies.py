"""The `CurrentUser` and `AdminUser` dependencies protected FastAPI routes declare.

Both security schemes are declared so that `/docs` offers both ways in: the OAuth2 password form (which posts
to `/login`) and pasting a token or API key. The header itself is checked by `auth.authenticate`.
"""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer, OAuth2PasswordBearer

from auth.users import User
from core.errors import Forbidden
from core.services import AppServices
from routes.guard import take_user

password_flow = OAuth2PasswordBearer(tokenUrl="login", auto_error=False, scheme_name="login")
bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="bearer", description="A token from POST /login, or an API key"
)


async def current_user(
    request: Request,
    services: AppServices,
    _documented_flow: Annotated[str | None, Depends(password_flow)],
    _documented_bearer: Annotated[object, Depends(bearer_scheme)],
) -> User:
    # Authenticated already, before the body was read (routes.guard); the fallback serves apps without it.
    return take_user(request.scope) or services.authenticator.authenticate(
        request.headers.get("authorization")
    )


CurrentUser = Annotated[User, Depends(current_user)]


async def admin_user(user: CurrentUser) -> User:
    if not user.is_admin:
        raise Forbidden("this is for admins only")
    return user


AdminUser = Annotated[User, Depends(admin_user)]

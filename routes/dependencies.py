"""What route handlers are given: the gateway's shared objects (`AppServices`), the caller (`CurrentUser`,
`AdminUser`) and who the audit trail says acted (`Acting`).

`Services` is the web layer's side of the composition root: the objects routes may use, which `services.py`
builds once per process and the app keeps in `app.state.services`.

Both security schemes are declared so that `/docs` offers both ways in: the OAuth2 password form (which posts
to `/login`) and pasting a token or API key. The header itself is checked by `auth.authenticate`.
"""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer, OAuth2PasswordBearer

from audit.actor import Actor
from audit.store import AuditStore
from auth.api_keys import ApiKeyStore
from auth.authenticate import Authenticator
from auth.login import PasswordCheck
from auth.passwords import PasswordHasher
from auth.policy import ModelPolicy
from auth.throttle import SignInThrottle
from auth.tokens import TokenSigner
from auth.users import User, UserStore
from cluster.redis_link import RedisLink
from core.client_address import client_address
from core.errors import Forbidden
from core.settings import Settings
from db.changes import ChangeWatcher
from db.engine import Database
from fleet.admission import Fleet
from fleet.changes import HostChanges
from routes.guard import take_user
from uploads.store import UploadStore
from upstream.client import Upstream
from usage.book import UsageBook
from usage.store import UsageStore


@dataclass
class Services:
    settings: Settings
    db: Database
    users: UserStore
    keys: ApiKeyStore
    signer: TokenSigner
    authenticator: Authenticator
    hasher: PasswordHasher
    throttle: SignInThrottle
    passwords: PasswordCheck
    uploads: UploadStore
    fleet: Fleet
    host_changes: HostChanges
    upstream: Upstream
    policy: ModelPolicy
    changes: ChangeWatcher
    usage: UsageBook
    usage_store: UsageStore
    audit: AuditStore
    # REDIS_URL's Redis, which replicas share state through (cluster/); None when unset.
    redis: RedisLink | None = None


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs a plain `def` dependency in a worker thread, a hop per request.
    return request.app.state.services


AppServices = Annotated[Services, Depends(get_services)]

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
    return take_user(request.scope) or await services.authenticator.authenticate(
        request.headers.get("authorization")
    )


CurrentUser = Annotated[User, Depends(current_user)]


async def admin_user(user: CurrentUser) -> User:
    if not user.is_admin:
        raise Forbidden("this is for admins only")
    return user


AdminUser = Annotated[User, Depends(admin_user)]


async def acting(request: Request, user: CurrentUser, services: AppServices) -> Actor:
    """The caller, as the audit trail names them: id, email, and the address the sign-in limits use."""
    return Actor(user.id, user.email, client_address(request.scope, services.settings.trusted_proxies))


Acting = Annotated[Actor, Depends(acting)]

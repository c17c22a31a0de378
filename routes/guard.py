"""Credentials first: every request outside the public pages is authenticated before anything reads its body.

FastAPI reads and parses a route's JSON body before it resolves the route's dependencies, so with
authentication as a dependency alone, a stranger could make the gateway read and parse a body (up to the
route's cap) without any credential. This pure ASGI guard sits in front of the router: it authenticates from
the Authorization header, answers 401 at once to anyone without valid credentials, and leaves the user in the
request's state, where `CurrentUser` or the relay endpoint takes it from (one authentication per request;
taken, not read, so that a stream held open for minutes does not keep it). A request made with an API key
also leaves the key's id there (caps count per key) and, for a batch key, that its requests are batch.

Public: the web page, its icon and files, `/health`, `/login`, the docs, Ollama's `/api/version`, and CORS
preflights (OPTIONS). `/metrics` checks its readers itself: Prometheus may come with METRICS_TOKEN, which is
no one's credential (routes.metrics).

The caller's user and key ids go into the request's access log entry (observe.request_log).
"""

from collections.abc import Awaitable

from starlette.types import ASGIApp, Receive, Scope, Send

from auth.users import User
from core.errors import GatewayError, error_response, rendered_by_the_app
from core.storage_errors import StorageError
from db.models import BATCH
from observe.request_log import request_log

# `/api/version` as in Ollama, which serves it (and `HEAD /`) to anyone: clients use it to test a connection.
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/favicon.ico",
        "/health",
        "/login",
        "/docs",
        "/redoc",
        "/openapi.json",
        "/api/version",
    }
)
PUBLIC_PREFIXES = ("/static/",)
# Paths whose route accepts credentials of its own besides a user's, and checks them itself; no body is read.
SELF_CHECKED_PATHS = frozenset({"/metrics"})
USER_STATE_KEY = "user"
API_KEY_STATE_KEY = "api_key"
BATCH_KEY_STATE_KEY = "batch_key"
KEY_QUOTA_STATE_KEY = "key_quota"


def take_user(scope: Scope) -> User | None:
    """The user the guard authenticated for this request, if any; removed from the scope."""
    user = scope.get("state", {}).pop(USER_STATE_KEY, None)
    return user if isinstance(user, User) else None


def take_api_key(scope: Scope) -> str | None:
    """The id of the API key the request came with, if it came with one (its caps count per key)."""
    key = scope.get("state", {}).pop(API_KEY_STATE_KEY, None)
    return key if isinstance(key, str) else None


def take_batch_key(scope: Scope) -> bool:
    """Whether the request came with a batch API key: its model calls wait behind interactive ones."""
    return scope.get("state", {}).pop(BATCH_KEY_STATE_KEY, False) is True


def take_key_quota(scope: Scope) -> dict | None:
    """The quota of the API key the request came with, if it has one (usage.quotas)."""
    quota = scope.get("state", {}).pop(KEY_QUOTA_STATE_KEY, None)
    return quota if isinstance(quota, dict) else None


def is_public(method: str, path: str) -> bool:
    return method == "OPTIONS" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class CredentialsFirst:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # What needs no check gets the app's own coroutine, not one of this layer's around it.
        if (
            scope["type"] != "http"
            or is_public(scope["method"], scope["path"])
            or scope["path"] in SELF_CHECKED_PATHS
        ):
            return self.app(scope, receive, send)
        return self._checked(scope, receive, send)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        try:
            caller = await scope["app"].state.services.authenticator.identify(
                authorization.decode("latin-1") if authorization is not None else None
            )
        except GatewayError as refused:
            # Nothing of the body is read: the answer goes out at once (what the client still sends is
            # dropped, for a limited time: core.server).
            answer = error_response(refused.status, refused.message, refused.headers, path=scope["path"])
            await answer(scope, receive, send)
            return
        except StorageError as failed:
            # A locked database while looking the credential up: the app's 503, not a 500 (this guard runs
            # outside FastAPI's exception middleware).
            await (await rendered_by_the_app(scope, receive, failed))(scope, receive, send)
            return
        entry = request_log(scope)
        if entry is not None:
            entry.user_id = caller.user.id
            entry.key_id = caller.key.id if caller.key is not None else None
        state = scope.setdefault("state", {})
        state[USER_STATE_KEY] = caller.user
        if caller.key is not None:
            state[API_KEY_STATE_KEY] = str(caller.key.id)
            if caller.key.priority == BATCH:
                state[BATCH_KEY_STATE_KEY] = True
            if caller.key.quota:
                state[KEY_QUOTA_STATE_KEY] = caller.key.quota
        await self.app(scope, receive, send)

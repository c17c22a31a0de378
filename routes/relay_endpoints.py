"""The relay endpoints' fast path: pure ASGI, in front of FastAPI's router.

Measured on this project's machines, FastAPI's per-request dependency solving and routing cost more CPU than
the relay itself (about 40% of a /chat request's time in the gateway), and that cost lands all at once when
hundreds of streams start together. Relay endpoints are therefore served here, straight from a table
(`routes.ollama`): look up the route, authenticate, check access and the model policy, relay. Everything else
(login, uploads, admin) stays on FastAPI. The same table generates these endpoints' OpenAPI documentation
(`routes.relay_docs`).
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import quote

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from auth.users import User
from core.errors import Forbidden, GatewayError, error_response
from routes.dependencies import Services
from routes.guard import take_user
from upstream.bodies import (
    BodyRules,
    model_named_in,
    read_body_fields,
    refuse_content_encoding,
)
from upstream.headers import upstream_request_headers
from upstream.passthrough import relay

# RFC 3986 pchar and "/": what may stand unencoded in a request line's path.
PATH_SAFE = "/:@!$&'()*+,;="


class Access(Enum):
    USER = "user"
    ADMIN = "admin"


class Body(Enum):
    NONE = "none"
    JSON = "json"  # read whole (capped by MAX_REQUEST_MB), checked, forwarded unchanged
    STREAM = "stream"  # passed through as it arrives, never held: blobs can be many GB


@dataclass(frozen=True)
class ModelList:
    """Where an answer keeps its list of models, and what names each one."""

    field: str
    name_key: str


OLLAMA_MODEL_LIST = ModelList("models", "name")
OPENAI_MODEL_LIST = ModelList("data", "id")


@dataclass(frozen=True)
class RelayRoute:
    """A gateway endpoint that forwards to Ollama."""

    method: str
    path: str  # the exact path, or with `param`, the prefix its parameter follows
    summary: str
    upstream_path: str | None = None  # default: the same path
    param: str | None = None  # the name of a trailing path parameter, for the docs
    param_names_model: bool = False  # the parameter is a model name (`/v1/models/{model}`)
    check_param: Callable[[str], None] | None = None
    access: Access = Access.USER
    body: Body = Body.NONE
    # What the gateway reads of a JSON body (the model, mostly). With no rules (admin calls), the body is
    # still read as one JSON object, like every other.
    body_rules: BodyRules = field(default_factory=BodyRules)
    model_list: ModelList | None = None  # the answer is a model list, filtered by the policy
    request_model: Any = None  # pydantic model describing the body, for the docs
    body_schema: dict[str, Any] | None = None  # or a JSON schema describing it
    param_schema: dict[str, Any] | None = None  # the path parameter's JSON schema, for the docs
    response_doc: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @property
    def doc_path(self) -> str:
        return f"{self.path}{{{self.param}}}" if self.param else self.path


class RelayEndpoints:
    def __init__(self, app: ASGIApp, routes: list[RelayRoute]) -> None:
        self.app = app
        self.exact = {(route.method, route.path): route for route in routes if route.param is None}
        self.prefixed = [route for route in routes if route.param is not None]
        self.methods_by_path: dict[str, set[str]] = {}
        for route in routes:
            if route.param is None:
                self.methods_by_path.setdefault(route.path, set()).add(route.method)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        route, param = self._match(method, path)
        if route is not None:
            try:
                response = await self._respond(route, param, scope, receive)
            except asyncio.CancelledError:
                # Still waiting for Ollama (a model load) when GRACEFUL_SHUTDOWN_SECONDS ran out: say so,
                # rather than let uvicorn answer a bare 500.
                await error_response(503, "the gateway is shutting down", path=path)(scope, receive, send)
                raise
        elif path in self.methods_by_path:
            allowed = ", ".join(sorted(self.methods_by_path[path]))
            response = error_response(405, "method not allowed", {"Allow": allowed}, path=path)
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _match(self, method: str, path: str) -> tuple[RelayRoute | None, str | None]:
        route = self.exact.get((method, path))
        if route is not None:
            return route, None
        for candidate in self.prefixed:
            if (
                candidate.method == method
                and path.startswith(candidate.path)
                and len(path) > len(candidate.path)
            ):
                return candidate, path[len(candidate.path) :]
        return None, None

    async def _respond(
        self, route: RelayRoute, param: str | None, scope: Scope, receive: Receive
    ) -> Response:
        services: Services = scope["app"].state.services
        request = Request(scope, receive)
        path = scope["path"]
        try:
            user = take_user(scope) or services.authenticator.authenticate(
                request.headers.get("authorization")
            )
            if route.access is Access.ADMIN and not user.is_admin:
                raise Forbidden("only admins may manage models")
            if param is not None:
                if route.check_param is not None:
                    route.check_param(param)
                if route.param_names_model:
                    services.policy.require(user, param)
            upstream_path = route.upstream_path or route.path
            if param is not None:
                # The parameter as checked (decoded), encoded again for the request line: left decoded,
                # %0D%0A would end that line and let a client write its own headers and requests to Ollama.
                upstream_path += quote(param, safe=PATH_SAFE)
            if route.model_list is not None:
                return await self._filtered_list(services, user, route.model_list, upstream_path)
            body, length = await self._body(route, request, services, user)
            if scope.get("query_string"):
                upstream_path += "?" + scope["query_string"].decode("latin-1")
            headers = upstream_request_headers(scope["headers"])
            return await relay(
                services.upstream, route.method, upstream_path, headers=headers, body=body, length=length
            )
        except GatewayError as error:
            return error_response(error.status, error.message, error.headers, path=path)
        except ClientDisconnect:
            # Gone while sending its body: nobody is left to answer, and nothing reached Ollama.
            return Response(status_code=499)

    async def _body(
        self, route: RelayRoute, request: Request, services: Services, user: User
    ) -> tuple[bytes | AsyncIterator[bytes] | None, int | None]:
        if route.body is Body.STREAM:
            declared = request.headers.get("content-length")
            return _passed_through(request.receive), int(
                declared
            ) if declared and declared.isdigit() else None
        if route.body is Body.NONE:
            return None, None
        refuse_content_encoding(request.headers.get("content-encoding"))
        raw = await request.body()
        rules = route.body_rules
        fields = await read_body_fields(raw, rules.fields)
        if rules.model_fields:
            services.policy.require(user, model_named_in(fields, rules.model_fields))
        if rules.check is not None:
            rules.check(fields)
        return raw, None

    async def _filtered_list(
        self, services: Services, user: User, model_list: ModelList, upstream_path: str
    ) -> Response:
        answer = await services.upstream.fetch_json("GET", upstream_path)
        if not isinstance(answer, dict) or not isinstance(answer.get(model_list.field), list):
            raise GatewayError(502, f"Ollama's {upstream_path} answer has no '{model_list.field}' list")
        answer[model_list.field] = services.policy.visible(
            user, answer[model_list.field], model_list.name_key
        )
        return JSONResponse(answer)


async def _passed_through(receive: Receive) -> AsyncIterator[bytes]:
    """The request body, piece by piece as the client sends it. uvicorn stops reading from the client while
    a piece waits here, so a fast client can't fill the gateway's memory ahead of a slow Ollama."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise GatewayError(400, "the client went away before the whole body was sent")
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return

"""The endpoints that relay to Ollama: routes of the app's own router whose endpoint is a bare ASGI app.

Measured on this project's machines, FastAPI's per-request work (a Request object, dependency solving,
validation) cost more CPU than the relay itself (about 40% of a /chat request's time in the gateway), and
that cost lands all at once when hundreds of streams start together. So each relay endpoint is a plain
Starlette `Route` (`RelayRoute`) whose endpoint is an ASGI app (`RelayEndpoint`): Starlette treats an endpoint
that is neither a function nor a method as ASGI and calls it with the scope as it is, with nothing to wrap or
solve. It authenticates (or takes the user `routes.guard` authenticated), checks access and the model
policy, and relays (`upstream.passthrough`).

Everything else is the app's, as for any route: the router answers 404, and 405 with `Allow` naming every
method of the path; an error raised here is rendered by the app's handlers (`core.errors`), a locked database
included. The routes sit first on the app's router as one entry, `RelayRoutes`, which finds a path's routes by
a dict lookup rather than asking each in turn; `RelayRoutesFirst` asks that same entry before FastAPI's
per-request layers, and calls the endpoint at once. Each route carries what its OpenAPI entry is made of
(`routes.relay_docs`). The table of these routes is `routes.ollama`.
"""

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import quote

from starlette.convertors import PathConvertor, register_url_convertor
from starlette.datastructures import URLPath
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, NoMatchFound, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from auth.users import User
from core.errors import INSUFFICIENT_QUOTA, Forbidden, GatewayError, error_response, rendered_by_the_app
from fleet.hosts import canonical_model, shown_model
from fleet.scheduler import Ask, Band
from observe.request_log import request_log
from routes.audit import note_model_management
from routes.dependencies import Services
from routes.dispatch import (
    EVERY_HOST,
    HOST_HEADER,
    admitted_relay,
    host_holding,
    merged_list,
    named_host,
    on_every_host,
)
from routes.guard import take_api_key, take_batch_key, take_key_quota, take_user
from upstream.bodies import (
    BodyRules,
    model_named_in,
    read_body_fields,
    refuse_content_encoding,
    with_usage_asked,
)
from upstream.go_json import GoFields
from upstream.headers import upstream_request_headers
from upstream.passthrough import relay
from usage.quotas import QuotaExceeded, subjects_of

# RFC 3986 pchar and "/": what may stand unencoded in a request line's path.
PATH_SAFE = "/:@!$&'()*+,;="


class _RestOfPath(PathConvertor):
    """The rest of the path, slashes included (model names hold them), never empty: `/v1/models/` names no
    model, and is not found. Any character: a decoded %0D%0A must reach the check, and be encoded again."""

    regex = r"[\s\S]+"


REST_OF_PATH = "rest_of_path"
register_url_convertor(REST_OF_PATH, _RestOfPath())
_TRAILING_PARAM = re.compile(r"\{(\w+)\}$")


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


class RelayRoute(Route):
    """A gateway endpoint that forwards to Ollama, for one method.

    `path` may end with a path parameter (`/v1/models/{model}`): it takes the rest of the path, slashes
    included, checked by `check_param` and, with `param_names_model`, by the model policy."""

    def __init__(
        self,
        method: str,
        path: str,
        summary: str,
        *,
        upstream_path: str | None = None,  # default: the same path
        param_names_model: bool = False,
        check_param: Callable[[str], None] | None = None,
        access: Access = Access.USER,
        body: Body = Body.NONE,
        # What the gateway reads of a JSON body (the model, mostly). With no rules (admin calls), the body is
        # still read as one JSON object, like every other.
        body_rules: BodyRules | None = None,
        model_list: ModelList | None = None,  # the answer is a model list, filtered by the policy
        runs_model: bool = False,  # a model call: admitted by the fleet's fair queue (routes.dispatch)
        # An OpenAI-style stream whose usage the gateway asks Ollama for (`stream_options.include_usage`).
        asks_usage: bool = False,
        embeds: bool = False,  # an embedding: nothing generated, no completion tokens
        request_model: Any = None,  # pydantic model describing the body, for the docs
        body_schema: dict[str, Any] | None = None,  # or a JSON schema describing it
        param_schema: dict[str, Any] | None = None,  # the path parameter's JSON schema, for the docs
        response_doc: dict[str, Any] | None = None,
        tags: tuple[str, ...] = (),
    ) -> None:
        trailing = _TRAILING_PARAM.search(path)
        self.param = trailing.group(1) if trailing else None
        routed = path if trailing is None else f"{path[: trailing.start()]}{{{self.param}:{REST_OF_PATH}}}"
        super().__init__(routed, endpoint=RelayEndpoint(self), methods=[method], name=f"{method} {path}")
        # Starlette lets a GET route answer HEAD too; Ollama's HEAD routes are relayed as routes of their own.
        self.methods = {method}
        self.method = method
        self.summary = summary
        # The parameter as checked, encoded again, goes after the path before it.
        self.upstream_path = upstream_path or (path if trailing is None else path[: trailing.start()])
        self.param_names_model = param_names_model
        self.check_param = check_param
        self.access = access
        self.body = body
        self.body_rules = body_rules or BodyRules()
        self.model_list = model_list
        self.runs_model = runs_model
        self.asks_usage = asks_usage
        self.embeds = embeds
        self.request_model = request_model
        self.body_schema = body_schema
        self.param_schema = param_schema
        self.response_doc = response_doc or {}
        self.tags = tags

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # What Route.matches decides, for a path without parameters by comparing strings (no regex).
        if self.param is not None or scope["type"] != "http" or scope.get("root_path"):
            return super().matches(scope)
        if scope["path"] != self.path:
            return Match.NONE, {}
        child_scope = {"endpoint": self.endpoint, "path_params": scope.get("path_params", {})}
        return Match.FULL if scope["method"] == self.method else Match.PARTIAL, child_scope


class RelayRoutes(BaseRoute):
    """The relay routes as one entry of the app's router, which finds a path's routes by a dict lookup.

    The router asks its routes one after another, each one a Python call; most of the gateway's requests are
    for relay routes, and asking them in turn cost a short request about 4% of its CPU, as much as the
    relay's own request head. Each member answers as a `RelayRoute` does alone (FULL, or PARTIAL for another
    method of its path); the router and the app's handlers do the rest (404, 405 and its Allow, errors)."""

    def __init__(self, routes: list[RelayRoute]) -> None:
        self.routes = routes
        self._by_path: dict[str, list[RelayRoute]] = {}
        for route in routes:
            if route.param is None:
                self._by_path.setdefault(route.path, []).append(route)
        self._with_param = [route for route in routes if route.param is not None]

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http":
            return Match.NONE, {}
        candidates = self.routes if scope.get("root_path") else self._by_path.get(scope["path"])
        partial: Scope | None = None
        for route in self._with_param if candidates is None else candidates:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                return match, child_scope
            if match is Match.PARTIAL and partial is None:
                partial = child_scope
        return (Match.NONE, {}) if partial is None else (Match.PARTIAL, partial)

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        for route in self.routes:
            try:
                return route.url_path_for(name, **path_params)
            except NoMatchFound:
                pass
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The endpoint that matched names its route, which answers 405 for another method of its path.
        await scope["endpoint"].route.handle(scope, receive, send)


class RelayEndpoint:
    """The ASGI app behind one `RelayRoute`."""

    __slots__ = ("route",)

    def __init__(self, route: RelayRoute) -> None:
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._respond(scope, receive)
        except asyncio.CancelledError:
            # Still waiting for Ollama (a model load) when GRACEFUL_SHUTDOWN_SECONDS ran out: say so, rather
            # than let uvicorn answer a bare 500.
            await error_response(503, "the gateway is shutting down", path=scope["path"])(
                scope, receive, send
            )
            raise
        except Exception as refused:
            # Nothing is sent yet: the app's handlers say it, as for any route (the endpoint may have been
            # called by RelayRoutesFirst, outside FastAPI's exception middleware). Once the answer has begun,
            # `relay` ends a failing stream itself.
            response = await rendered_by_the_app(scope, receive, refused)
        await response(scope, receive, send)

    async def _respond(self, scope: Scope, receive: Receive) -> Response:
        route = self.route
        services: Services = scope["app"].state.services
        head = _RequestHead(scope["headers"])
        user = take_user(scope) or await services.authenticator.authenticate(head.authorization)
        if route.access is Access.ADMIN and not user.is_admin:
            raise Forbidden("only admins may manage models")
        upstream_path = route.upstream_path
        if route.param is not None:
            param: str = scope["path_params"][route.param]
            if route.check_param is not None:
                route.check_param(param)
            if route.param_names_model:
                services.policy.require(user, param)
            # The parameter as checked (decoded), encoded again for the request line: left decoded, %0D%0A
            # would end that line and let a client write its own headers and requests to Ollama.
            upstream_path += quote(param, safe=PATH_SAFE)
        if route.model_list is not None:
            return await _filtered_list(services, user, route.model_list, upstream_path)
        body, length, model, fields = await _body(route, head, receive, services, user)
        if scope.get("query_string"):
            upstream_path += "?" + scope["query_string"].decode("latin-1")
        headers = upstream_request_headers(scope["headers"])
        if route.runs_model and isinstance(body, bytes) and model is not None and fields is not None:
            call = _ModelCall(route, user, head, upstream_path, headers, body, model, fields)
            return await _model_call(scope, receive, services, call)
        fleet = services.fleet
        if route.access is Access.ADMIN:
            if (head.ollama_host or "").strip().lower() == EVERY_HOST:
                if not isinstance(body, bytes | None):
                    raise GatewayError(400, f"a blob goes to one host: name it in {HOST_HEADER}")
                managed = await on_every_host(fleet, route.method, upstream_path, headers=headers, body=body)
            else:
                upstream = named_host(fleet, head.ollama_host).upstream
                managed = await relay(
                    upstream, route.method, upstream_path, headers=headers, body=body, length=length
                )
            if route.method != "HEAD":  # asking whether a blob is there changes nothing
                await note_model_management(
                    services, scope, user, route.upstream_path, body, head.ollama_host
                )
            return managed
        else:
            named = scope["path_params"][route.param] if route.param_names_model and route.param else model
            upstream = host_holding(fleet, canonical_model(named) if named else None)
        return await relay(upstream, route.method, upstream_path, headers=headers, body=body, length=length)


@dataclass(frozen=True)
class _ModelCall:
    route: RelayRoute
    user: User
    head: "_RequestHead"
    upstream_path: str
    headers: list[tuple[str, str]]
    body: bytes
    model: str
    fields: GoFields


async def _model_call(scope: Scope, receive: Receive, services: Services, call: _ModelCall) -> Response:
    """A call that runs a model: held against the quotas, admitted by the fair queue, relayed, recorded."""
    # A batch key's requests are batch whatever they say; any request may lower itself (X-Priority).
    route, user, body = call.route, call.user, call.body
    band = Band.BATCH if take_batch_key(scope) else call.head.band
    key_id = take_api_key(scope)
    key_row = int(key_id) if key_id is not None else None
    key_quota = take_key_quota(scope)
    model_key = canonical_model(call.model)
    hide_usage = False
    fields = call.fields
    if (
        route.asks_usage
        and fields.flag("stream")
        and not fields.member_flag("stream_options", "include_usage")
    ):
        # Ollama says what an OpenAI-style stream used only when asked; the client did not ask, so the
        # gateway asks, and keeps that last event to itself.
        body, hide_usage = with_usage_asked(body), True
    tally = services.usage.open(
        user_id=user.id,
        key_id=key_row,
        surface=route.path,
        model=shown_model(model_key),
        band=band.label,
        openai=route.path.startswith("/v1/"),
        embeds=route.embeds,
        body_bytes=len(body),
        holder=request_log(scope),
    )
    subjects = subjects_of(user.id, user.quota, key_row, key_quota)
    try:
        await services.usage.hold(tally, subjects, services.fleet.scheduler.cost_of(model_key))
    except QuotaExceeded as exceeded:
        retry_after = {"Retry-After": str(exceeded.retry_after)}
        # A 503 is quotas unknowable (Redis not answering), not a budget used up.
        kind = INSUFFICIENT_QUOTA if exceeded.status == 429 else None
        raise GatewayError(exceeded.status, exceeded.message, retry_after, openai_type=kind) from None
    ask = Ask(
        str(user.id),
        model_key,
        band,
        key=key_id,
        user_inflight=user.max_inflight,
        user_waiting=user.max_waiting,
    )
    return await admitted_relay(
        services.fleet,
        ask,
        receive,
        route.method,
        call.upstream_path,
        headers=call.headers,
        body=body,
        tally=tally,
        hide_usage=hide_usage,
    )


class RelayRoutesFirst:
    """Calls the relay endpoint a request is for straight away, found by the router's own `RelayRoutes`
    entry, and hands every other request (another method of a relay path included: the router's 405) on
    to FastAPI's stack.

    What it skips is FastAPI's per-request work in front of the router, which a bare ASGI endpoint has no
    use for: the exception middleware (a Request object, and a wrapper around every `send`, so a call per
    streamed chunk) and the exit stack for uploaded files. Measured on /api/embed, those layers cost a short
    request about 10% more CPU than it cost before the relay endpoints were routes (bench short,
    `--baseline`). The table, the errors' rendering and the docs stay the router's and the app's."""

    def __init__(self, app: ASGIApp, routes: RelayRoutes) -> None:
        self.app = app
        self._routes = routes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The endpoint's (or the app's) own coroutine, not one of this layer's around it: a stream held open
        # for minutes keeps no frame of this.
        match, child_scope = self._routes.matches(scope)
        if match is Match.FULL:
            scope.update(child_scope)
            return child_scope["endpoint"](scope, receive, send)
        return self.app(scope, receive, send)


class _RequestHead:
    """The few request headers the endpoint reads, found in one pass over the scope's (the server gives
    their names lower-cased). Of a header sent twice, the first counts, as for the credentials guard; but
    any Content-Encoding other than identity is refused."""

    __slots__ = ("authorization", "band", "content_encoding", "content_length", "ollama_host")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.authorization: str | None = None
        self.content_encoding: str | None = None
        self.content_length: str | None = None
        self.ollama_host: str | None = None
        # A client may lower its own priority (X-Priority: batch), never raise it: any other value is the
        # default, interactive.
        self.band = Band.INTERACTIVE
        for name, value in headers:
            if name == b"authorization":
                if self.authorization is None:
                    self.authorization = value.decode("latin-1")
            elif name == b"x-priority":
                if value.strip().lower() == b"batch":
                    self.band = Band.BATCH
            elif name == b"x-ollama-host":
                if self.ollama_host is None:
                    self.ollama_host = value.decode("latin-1")
            elif name == b"content-length":
                if self.content_length is None:
                    self.content_length = value.decode("latin-1")
            elif (
                name == b"content-encoding"
                and self.content_encoding is None
                and value.strip().lower() != b"identity"
            ):
                self.content_encoding = value.decode("latin-1")


async def _body(
    route: RelayRoute, head: _RequestHead, receive: Receive, services: Services, user: User
) -> tuple[bytes | AsyncIterator[bytes] | None, int | None, str | None, GoFields | None]:
    """The body to forward, its length if streamed, the model it names (checked by the policy), and the
    fields the gateway read of it."""
    if route.body is Body.STREAM:
        declared = head.content_length
        length = int(declared) if declared and declared.isdigit() else None
        return _passed_through(receive), length, None, None
    if route.body is Body.NONE:
        return None, None, None, None
    refuse_content_encoding(head.content_encoding)
    raw = await _whole_body(receive)
    rules = route.body_rules
    fields = await read_body_fields(raw, rules.fields)
    model = None
    if rules.model_fields:
        model = model_named_in(fields, rules.model_fields)
        services.policy.require(user, model)
    if rules.check is not None:
        rules.check(fields)
    return raw, None, model, fields


async def _filtered_list(
    services: Services, user: User, model_list: ModelList, upstream_path: str
) -> Response:
    answer = await merged_list(services.fleet, upstream_path, model_list.field, model_list.name_key)
    answer[model_list.field] = services.policy.visible(user, answer[model_list.field], model_list.name_key)
    return JSONResponse(answer)


async def _whole_body(receive: Receive) -> bytes:
    """The request body, read whole (its cap is core.body_limit's)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect  # gone while sending its body: nobody is left to answer
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


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

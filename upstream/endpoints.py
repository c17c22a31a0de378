"""The relay endpoints' fast path: pure ASGI, in front of FastAPI's router.

Measured on this project's machines, FastAPI's per-request dependency solving and routing cost more CPU than
the relay itself (about 40% of a /chat request's time in the gateway), and that cost lands all at once when
hundreds of streams start together. Relay endpoints are therefore served here, straight from a table: look up
the route, authenticate, read and check the body, relay. Everything else (login, uploads, admin) stays on
FastAPI. The same table generates these endpoints' OpenAPI documentation (`upstream.docs`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from auth.authenticate import authenticate
from core.errors import GatewayError, error_response
from core.services import Services
from upstream.headers import upstream_request_headers
from upstream.relay import relay


@dataclass(frozen=True)
class RelayRoute:
    """A gateway endpoint that forwards to one Ollama endpoint."""

    method: str
    path: str
    upstream_path: str
    summary: str
    check_body: Callable[[bytes], Any] | None = None
    # OpenAPI: the request body's JSON schema (a pydantic model) and the success response's description.
    request_model: Any = None
    response_doc: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


class RelayEndpoints:
    def __init__(self, app: ASGIApp, routes: list[RelayRoute]) -> None:
        self.app = app
        self.routes = {(route.method, route.path): route for route in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get((scope.get("method"), scope.get("path"))) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        response = await self._respond(route, scope, receive)
        await response(scope, receive, send)

    async def _respond(self, route: RelayRoute, scope: Scope, receive: Receive) -> Response:
        services: Services = scope["app"].state.services
        request = Request(scope, receive)
        try:
            authenticate(request.headers.get("authorization"), services.signer, services.users)
            body = await request.body()
            if route.check_body is not None:
                route.check_body(body)
            headers = upstream_request_headers(scope["headers"])
            return await relay(
                services.upstream, route.method, route.upstream_path, headers=headers, body=body
            )
        except GatewayError as error:
            return error_response(error.status, error.message, error.headers)
